"""Timing a way: each from a clean state, every way once a round, their speeds (`TrainSpeed`,
`EvalSpeed`) and the machine's state while they ran (CPU shares from /proc/stat, load, versions)."""

from __future__ import annotations

import functools
import gc
import os
import platform
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

BUSY = 0.8  # a CPU share below this: other work on the machine may have slowed the way down
OTHERS_BUSY = 0.1  # other processes' share of the cores above this: it did


# ----------------------------------------------------------------------------------------------
# Speeds


@dataclass
class TrainSpeed:
    steps: int  # optimizer steps timed
    seconds: float
    real_tokens: int  # non-padding tokens in the timed steps
    processed_tokens: int  # token positions computed in them, padding included
    dataset_examples: int  # what the way trained from: the same dialogues in every way
    dataset_real_tokens: int | None = None
    rows: int | None = None  # rows (examples) in the timed steps, where the way shows them
    settings: dict[str, Any] = field(default_factory=dict)
    cpu_share: float | None = None  # see run_way
    other_cpu_share: float | None = None
    rounds: int = 1  # timed parts summed into this (Sizes.train_rounds)

    @classmethod
    def combined(cls, parts: Sequence[TrainSpeed]) -> TrainSpeed:
        """One way's rounds as one: steps, seconds, tokens and rows summed; CPU shares weighted by time."""
        times = [p.seconds for p in parts]
        rows = None if any(p.rows is None for p in parts) else sum(p.rows for p in parts)
        return cls(sum(p.steps for p in parts), sum(times), sum(p.real_tokens for p in parts),
                   sum(p.processed_tokens for p in parts), parts[0].dataset_examples, parts[0].dataset_real_tokens,
                   rows, parts[0].settings, weighted_mean([p.cpu_share for p in parts], times),
                   weighted_mean([p.other_cpu_share for p in parts], times), len(parts))

    @property
    def real_tokens_per_second(self) -> float:
        return self.real_tokens / self.seconds

    @property
    def padding_efficiency(self) -> float:
        return self.real_tokens / self.processed_tokens

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "real_tokens_per_second": self.real_tokens_per_second,
                "padding_efficiency": self.padding_efficiency,
                "real_tokens_per_step": self.real_tokens / self.steps}

    def describe(self) -> str:
        return (f"{self.real_tokens_per_second:,.0f} real tokens/s over {self.steps} steps, padding efficiency "
                f"{self.padding_efficiency:.2f}{busy(self)}")


@dataclass
class EvalSpeed:
    dialogues: int  # test dialogues the way produces predictions for
    rows: int  # generations that takes: one per flattened row, or one per dialogue (dsum)
    rows_timed: int  # rows actually generated and timed (fewer when extrapolated)
    batch_size: int
    seconds_timed: float
    mean_new_tokens: float  # tokens generated a row: equal across ways, or the comparison is unfair
    cpu_share: float | None = None  # see run_way
    other_cpu_share: float | None = None
    rounds: int = 1  # timed parts summed into this (Sizes.eval_rounds)

    @classmethod
    def combined(cls, parts: Sequence[EvalSpeed]) -> EvalSpeed:
        """One way's rounds as one: rows and seconds summed; per-row and per-second figures weighted."""
        times = [p.seconds_timed for p in parts]
        return cls(parts[0].dialogues, parts[0].rows, sum(p.rows_timed for p in parts), parts[0].batch_size, sum(times),
                   weighted_mean([p.mean_new_tokens for p in parts], [p.rows_timed for p in parts]),
                   weighted_mean([p.cpu_share for p in parts], times),
                   weighted_mean([p.other_cpu_share for p in parts], times), len(parts))

    @property
    def extrapolated(self) -> bool:
        return self.rows_timed < self.rows

    @property
    def seconds(self) -> float:
        """Seconds for all the rows: the timed ones scaled up when only some were timed."""
        return self.seconds_timed * self.rows / self.rows_timed

    @property
    def dialogues_per_second(self) -> float:
        return self.dialogues / self.seconds

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "extrapolated": self.extrapolated, "seconds": self.seconds,
                "dialogues_per_second": self.dialogues_per_second}

    def describe(self) -> str:
        timed = (f", timed on {self.rows_timed} of {self.rows} rows and extrapolated" if self.extrapolated else "")
        return (f"{self.dialogues_per_second:.2f} dialogues/s ({self.rows} generations of {self.mean_new_tokens:.1f} "
                f"tokens, batch {self.batch_size}{timed}){busy(self)}")


def weighted_mean(values: Sequence[float | None], weights: Sequence[float]) -> float | None:
    """None where a part has no figure (a share the system does not report)."""
    if any(v is None for v in values):
        return None
    return sum(v * w for v, w in zip(values, weights)) / sum(weights)


def busy(speed: TrainSpeed | EvalSpeed) -> str:
    if speed.cpu_share is None:
        return ""
    if speed.other_cpu_share is None:  # no system-wide figure: the process's own share has to tell
        return f"; cpu share {speed.cpu_share:.2f}" + (" (the machine was busy)" if speed.cpu_share < BUSY else "")
    return (f"; cpu share {speed.cpu_share:.2f}, other processes {speed.other_cpu_share:.2f}"
            + (" (the machine was busy)" if speed.other_cpu_share > OTHERS_BUSY else ""))


# ----------------------------------------------------------------------------------------------
# Running the ways


def in_rounds(label: str, ways: dict[str, Callable[[Any], Any]], parts: Sequence, seeds: Sequence[int], device: str,
              combine: Callable[[list], Any]) -> dict[str, Any]:
    """Every way once a round, in turn, each round on its part (and from its seed); each way's rounds
    combined into one speed. A slow spell on the machine then falls on every way, not on the one that
    happened to be running."""
    timed = [{way: run_way(f"{label} {way}, round {number} of {len(parts)}", functools.partial(run, part), device, seed)
              for way, run in ways.items()}
             for number, (part, seed) in enumerate(zip(parts, seeds), start=1)]
    combined = {way: combine([speeds[way] for speeds in timed]) for way in ways}
    for way, speed in combined.items():
        print(f"bench: {label} {way}, {len(parts)} rounds: {speed.describe()}", flush=True)
    return combined


def run_way(label: str, run, device: str, seed: int):
    """Run one way from a clean state, with its progress line. On a CPU it also notes the share of the
    cores the process got, and the share of the machine's cores other processes took meanwhile (where
    the system tells it): the second is what says that other work slowed this way down, since the
    first also falls with the way's own single-threaded work (dsum's setup inside its phase)."""
    import torch

    with phase(label) as note:
        fresh_state(seed)
        cpu, wall, machine = time.process_time(), time.perf_counter(), machine_cpu_seconds()
        result = run()
        if device == "cpu":
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            machine = None if machine is None else machine_cpu_seconds() - machine
            result.cpu_share, result.other_cpu_share = cpu_shares(cpu, wall, machine, torch.get_num_threads(),
                                                                  os.cpu_count() or 1)
        note(result.describe())
    free_memory()
    return result


def fresh_state(seed: int) -> None:
    """Each way starts as in its own process: no Accelerate state left by the previous one, same seed.

    Accelerate keeps process-wide state and offers no public way to clear it; a process per way would cost
    the imports of torch and transformers in each of a run's dozens of phases. So its private resets:
    - AcceleratorState (with PartialState under it) fixes the process's mixed precision and device at the
      first Accelerator: a way or model with another precision after it would be refused ("already
      initialized"), and each way's Accelerator (dsum's, the Trainer's, no_trainer's) is built anew.
    - GradientState keeps the dataloaders a loop left before their end (no_trainer stops mid-epoch, and
      Accelerate unregisters a dataloader only at its end), whose end-of-data flag would then steer the
      gradient sync of the next way's accumulation."""
    from accelerate.state import AcceleratorState, GradientState
    from transformers import set_seed

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    set_seed(seed)


@contextmanager
def collections_skip_what_lives_now() -> Iterator[None]:
    """Python's garbage collector leaves alone the objects alive now (gc.freeze), until the block ends.

    The libraries the ways import leave about half a million objects, and a full collection walks them
    all (about 0.6 s on a 2-core CPU): free_memory collects after every way, and Python collects on its
    own now and then, inside the timed windows too, where one collection would cost a way a share of its
    few seconds that the others might not pay. Only the objects made later are walked; the models and
    optimizers of the ways are all made later, so they are freed as before."""
    import torch  # noqa: F401  (the heavy imports first, so that their objects are frozen too)
    import accelerate  # noqa: F401
    import transformers.trainer  # noqa: F401

    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def synchronize(device: str) -> None:
    """The clock reads after the GPU has finished what was queued."""
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


@contextmanager
def phase(name: str):
    """One progress line per phase, with its wall time and what it found."""
    started = time.perf_counter()
    found: list[str] = []
    yield found.append
    detail = f": {found[-1]}" if found else ""
    print(f"bench: {name} ({time.perf_counter() - started:.1f}s){detail}", flush=True)


@contextmanager
def workspace(given: Path | None) -> Iterator[Path]:
    if given is not None:
        given.mkdir(parents=True, exist_ok=True)
        yield given.resolve()
        return
    with tempfile.TemporaryDirectory(prefix="dsum-bench-") as tmp:
        yield Path(tmp)


# ----------------------------------------------------------------------------------------------
# The machine


def cpu_shares(own: float, wall: float, machine: float | None, threads: int, cores: int) -> tuple[float, float | None]:
    """(the share of its threads' time the way's process used, the share of the machine's cores that other
    processes took meanwhile), from the CPU seconds of the process (`own`) and of every process (`machine`,
    None where the system does not tell) over `wall` seconds."""
    others = None if machine is None else max(machine - own, 0.0) / (wall * cores)
    return own / (wall * threads), others


def machine_cpu_seconds(stat: Path = Path("/proc/stat")) -> float | None:
    """CPU seconds every process has used since boot, and that the hypervisor has given to other
    machines (steal), from Linux's /proc/stat; None elsewhere."""
    try:
        ticks = [int(t) for t in stat.read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    idle = ticks[3] + ticks[4]  # idle, iowait; the rest: user, nice, system, irq, softirq, steal
    return (sum(ticks) - idle) / os.sysconf("SC_CLK_TCK")


def machine(device: str, load_before: tuple[float, float, float]) -> dict[str, Any]:
    import accelerate
    import peft
    import torch
    import transformers

    info = {
        "device": device, "cpu": cpu_model(), "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "accelerate": accelerate.__version__, "peft": peft.__version__, "platform": platform.platform(),
        # Other work on the machine slows every way; the load says how quiet it was.
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
    }
    if device == "cuda":
        info.update(gpu=torch.cuda.get_device_name(0), cuda=torch.version.cuda)
    return info


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
