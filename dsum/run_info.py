"""What a run writes about itself: `run.json`, `metrics.jsonl` and tracker events (dsum/run_dir.py names them)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

from dsum import distributed
from dsum.config import Recipe, RecipeError, RunError, recipe_to_dict
from dsum.data.sources import text_lines
from dsum.run_dir import FIRST_STEP, METRICS_FILE, RUN_FILE, TENSORBOARD_DIR, flat, read_run

log = logging.getLogger(__name__)

PACKAGES = ("dsum", "torch", "transformers", "accelerate", "peft", "deepspeed", "bitsandbytes", "tokenizers", "datasets")
TRACKER_MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "aim": "aim",
                   "comet_ml": "comet_ml", "clearml": "clearml"}


class RunInfo:
    """`run.json`, rewritten at the start and the end of a run, by rank 0 alone.

    It holds the resolved recipe, package versions, git commit, the true world size and the Accelerate/DeepSpeed
    configuration; its `status` is `running` until `final/` exists, then `finished` (`stopped` after a signal,
    `failed` after an error; a killed process leaves `running`).

    As a context manager: an exception that leaves the block while the run is still `running` marks it
    `failed`, with the error's one line, before it goes on up."""

    def __init__(self, output_dir: Path, recipe: Recipe | None, accelerator, world_size: int):
        self.path = output_dir / RUN_FILE
        self.recipe = recipe
        self.accelerator = accelerator
        self.info: dict[str, Any] = {}
        self.world_size = world_size

    @classmethod
    def existing(cls, output_dir: Path) -> RunInfo:
        """The run.json an earlier `start` wrote, to be brought up to date (a run's evaluation, after its
        training)."""
        run = cls(output_dir, recipe=None, accelerator=None, world_size=0)
        run.info = read_run(output_dir)
        return run

    def start(self, **details: Any) -> None:
        """Written before anything else, so that a directory with dsum's files always says whose they are."""
        self.info = {
            "status": "running",
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "recipe": recipe_to_dict(self.recipe),
            "world_size": self.world_size,
            **details,
            "launch": launch_info(self.accelerator),
            "versions": versions(),
            "git_commit": git_commit(),
            "python": platform.python_version(),
        }
        self._write()

    def update(self, **details: Any) -> None:
        self.info.update(details)
        self._write()

    def stepped(self) -> None:
        """Told after every optimizer step; the first is written down: from then on the run has trained, and a
        new run replaces it only when asked (`run_dir.ended_before_training`)."""
        if FIRST_STEP not in self.info:
            self.update(**{FIRST_STEP: time.strftime("%Y-%m-%dT%H:%M:%S%z")})

    def finish(self, **details: Any) -> None:
        self.info.update(status="finished", finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"), **details)
        self._write()

    def __enter__(self) -> RunInfo:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if error is not None and self.info.get("status") == "running":
            self.update(status="failed", failed_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"), failure=one_line(error))

    def _write(self) -> None:
        if distributed.is_main():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(self.info, indent=2, default=str) + "\n")
            tmp.replace(self.path)


def one_line(error: BaseException) -> str:
    """dsum's own errors as the command prints them; others with their type, as a traceback ends."""
    lines = str(error).strip().splitlines()
    if isinstance(error, (RecipeError, RunError)) and lines:
        return lines[0]
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


class MetricsLog:
    """`metrics.jsonl`: one JSON object per logged step. A resumed run drops lines past its checkpoint."""

    def __init__(self, output_dir: Path, keep_through_step: int = 0):
        self.path = output_dir / METRICS_FILE
        if distributed.is_main():
            output_dir.mkdir(parents=True, exist_ok=True)
            kept = []
            if keep_through_step and self.path.is_file():
                kept = [line for line in text_lines(self.path.read_text())
                        if line.strip() and json.loads(line)["step"] <= keep_through_step]
            self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        if distributed.is_main():
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


class Trackers:
    """Experiment trackers on rank 0 (TensorBoard by default); those not installed are skipped with a note."""

    def __init__(self, output_dir: Path, recipe: Recipe):
        self.trackers = []
        if not distributed.is_main():
            return
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS

        config = {key: value if isinstance(value, (int, float, str, bool)) else json.dumps(value)
                  for key, value in flat(recipe_to_dict(recipe)).items()}
        for name in recipe.train.trackers:
            if importlib.util.find_spec(TRACKER_MODULES[name]) is None:
                log.warning("train.trackers: %s is not installed; skipping it", name)
                continue
            cls = LOGGER_TYPE_TO_CLASS[name]
            tracker = cls("dsum", str(output_dir / TENSORBOARD_DIR)) if name == "tensorboard" else cls("dsum")
            tracker.start()
            tracker.store_init_configuration(config)
            self.trackers.append(tracker)

    def log(self, values: dict[str, Any], step: int) -> None:
        scalars = {k: v for k, v in values.items() if isinstance(v, (int, float)) and k != "step"}
        for tracker in self.trackers:
            tracker.log(scalars, step=step)

    def finish(self) -> None:
        for tracker in self.trackers:
            tracker.finish()


def launch_info(accelerator) -> dict[str, Any]:
    state = accelerator.state
    info: dict[str, Any] = {
        "distributed_type": str(state.distributed_type),
        "accelerate_num_processes": state.num_processes,
        "mixed_precision": str(state.mixed_precision),
        "device": str(accelerator.device),
    }
    if state.deepspeed_plugin is not None:
        info["deepspeed_config"] = json.loads(json.dumps(state.deepspeed_plugin.deepspeed_config, default=str))
    if accelerator.distributed_type == "FSDP":
        info["fsdp"] = fsdp_settings(state.fsdp_plugin)
    return info


def fsdp_settings(plugin) -> dict[str, Any]:
    """What FSDP did: its version, whether it frees a block's gathered weights after the forward, whether the
    shards live in host memory, the checkpoints' state dict, and the block classes it made units of (once
    `prepare` has read them from the model)."""
    from torch.distributed.fsdp import CPUOffloadPolicy

    return {"version": plugin.fsdp_version, "reshard_after_forward": plugin.reshard_after_forward,
            "offload": isinstance(plugin.cpu_offload, CPUOffloadPolicy), "state_dict_type": plugin.state_dict_type.name,
            "wrapped_blocks": sorted(plugin.transformer_cls_names_to_wrap or [])}


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def git_commit() -> str | None:
    repo = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def source_checkout() -> dict[str, Any]:
    """The git commit dsum's own source was imported from, and whether tracked files differ from it:
    {"commit": SHA, "dirty": bool}, both None where the package is not the `dsum/` of a git checkout
    (an installed wheel, or no git). Untracked files do not count: results written into the checkout
    would otherwise mark the next run dirty."""
    package = Path(__file__).resolve().parent
    unknown = {"commit": None, "dirty": None}
    try:
        head = subprocess.run(["git", "rev-parse", "--show-toplevel", "HEAD"], cwd=package, capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return unknown
        top, commit = head.stdout.splitlines()
        if Path(top).resolve() / "dsum" != package:  # a wheel installed inside some other repository
            return unknown
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=package,
                                capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError, ValueError):
        return unknown
    return {"commit": commit, "dirty": bool(status.stdout.strip()) if status.returncode == 0 else None}
