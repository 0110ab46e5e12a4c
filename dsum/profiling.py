"""Where a training step's time goes, operator by operator: `StepProfiler` runs torch.profiler over a few
optimizer steps of one run and writes what it saw into a directory (`dsum bench --profile DIR`)."""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

TOP_OPERATORS = 25  # rows of each operator table
TOP_KERNELS = 10
CONSOLE_OPERATORS = 5
ACTIVE_STEPS = 3  # steps recorded: enough to average, few enough that the tables take seconds, not minutes
SUMMARY = "summary.json"
RUN_NAME = re.compile(r"[A-Za-z0-9._-]+")
# Host-side calls that show the CPU waiting for the GPU (synchronisations, copies, reading a value back)
# or feeding it (allocations, launches), counted by name prefix: "cudaMemcpy" also counts cudaMemcpyAsync.
HOST_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpy", "aten::_local_scalar_dense",
              "aten::item", "cudaMalloc", "cudaLaunchKernel", "cuLaunchKernel")
DEVICE_COPIES = ("Memcpy", "Memset")  # device-side activity that is not a kernel, by name


@dataclass(frozen=True)
class Schedule:
    """torch.profiler's schedule, in optimizer steps from the start of the run: `wait` steps untouched,
    `warmup` steps traced and thrown away (the tracer's own start-up), then `active` steps recorded."""

    wait: int
    warmup: int
    active: int

    @classmethod
    def after(cls, warmup_steps: int, steps: int | None = None, active: int = ACTIVE_STEPS) -> Schedule:
        """Up to `active` steps right after a run's first `warmup_steps` (at least 1), inside its `steps`
        (None: as many as it takes). The tracer's warm-up falls on the run's last warm-up step, so that
        its start-up costs a step that is not timed."""
        if warmup_steps < 1 or (steps is not None and steps <= warmup_steps):
            raise ValueError(f"a profile needs a warm-up step and a step after it; got {warmup_steps} warm-up "
                             f"steps of {steps}")
        left = active if steps is None else min(active, steps - warmup_steps)
        return cls(wait=warmup_steps - 1, warmup=1, active=left)


class StepProfiler:
    """torch.profiler over the steps of `schedule` in one run, called once per optimizer step through
    `step()`; its files are written when the block ends. With `directory` None it records nothing, and
    `step()` costs a method call.

        with StepProfiler(Path("profiles"), "t5-dsum", "cuda", Schedule.after(warmup_steps=3, steps=9)) as profile:
            for batch in batches:
                ...  # one optimizer step
                profile.step()

    Per run it writes NAME.txt and NAME.json: the top operators by self CPU time and by self device time, the
    share of the profiled steps' wall time in which the GPU ran a kernel, the host calls that show the CPU
    waiting for the GPU or feeding it, kernels launched a step and the mean step time; and it adds the run to
    DIR/summary.json, which holds every run profiled into DIR.
    """

    def __init__(self, directory: Path | None, name: str, device: str, schedule: Schedule):
        if not RUN_NAME.fullmatch(name):
            raise ValueError(f"profile name {name!r}: expected letters, digits, '.', '_' and '-' only")
        self.directory, self.name, self.device, self.schedule = directory, name, device, schedule
        self.record: dict[str, Any] | None = None  # what was written, once the block has ended
        self.steps_called = 0
        self._profiler = None

    @classmethod
    def off(cls) -> StepProfiler:
        """One that records nothing: for a loop that always calls `step()`."""
        return cls(None, "off", "cpu", Schedule(wait=0, warmup=0, active=1))

    def __enter__(self) -> StepProfiler:
        if self.directory is not None:
            import torch.profiler as tp

            activities = [tp.ProfilerActivity.CPU] + ([tp.ProfilerActivity.CUDA] if self.device == "cuda" else [])
            self._profiler = tp.profile(activities=activities, schedule=tp.schedule(**asdict(self.schedule), repeat=1),
                                        record_shapes=False, with_stack=False, profile_memory=False)
            self._profiler.__enter__()
        return self

    def step(self) -> None:
        """One optimizer step has ended."""
        if self._profiler is not None:
            self.steps_called += 1
            self._profiler.step()

    def __exit__(self, exc_type, exc, traceback) -> None:
        if self._profiler is None:
            return
        profiler, self._profiler = self._profiler, None
        profiler.__exit__(None, None, None)  # stopped whatever happened: a profiler left on slows everything after
        if exc_type is None:
            self.record = analyse(profiler.events(), self.name, self.device, self.schedule, self.steps_called)
            write_profile(self.directory, self.record)
            print(describe(self.record), flush=True)


# ----------------------------------------------------------------------------------------------
# What a profile says


def analyse(events: Sequence, name: str, device: str, schedule: Schedule, steps_called: int) -> dict[str, Any]:
    """The figures of one finished profile (torch's FunctionEvents), as written to NAME.json.

    Only the steps that ended are counted: a run that stops inside the recorded steps leaves a last
    ProfilerStep range open until the profiler stops, around whatever ran after the loop, and that
    range and the work in it are left out."""
    from torch.autograd import DeviceType

    steps = {n: span for n, span in step_ranges(e for e in events if e.device_type == DeviceType.CPU).items()
             if n < steps_called}
    span = (min(s for s, _ in steps.values()), max(e for _, e in steps.values())) if steps else None
    step_ms = [(end - start) / 1000 for _, (start, end) in sorted(steps.items())]
    on_device = device == "cuda"
    # What started inside the profiled steps: a kernel still queued from the last one when they end is
    # left out, as is one from the warm-up that runs into the first (the share cuts both at the span).
    inside = [e for e in events if span is not None and span[0] <= e.time_range.start <= span[1]]
    host = [e for e in inside if e.device_type == DeviceType.CPU and not e.is_async
            and not e.name.startswith("ProfilerStep")]
    kernels = [e for e in inside if device_activity(e) == "kernel"]
    copies = [e for e in inside if device_activity(e) == "copy"]
    operators = operator_totals(host)
    count = max(len(steps), 1)
    return {
        "name": name,
        "device": device,
        "schedule": asdict(schedule),
        # ProfilerStep#N spans the work between the N-th and the (N+1)-th call of step(): optimizer step N + 1.
        "optimizer_steps": sorted(n + 1 for n in steps),
        "profiled_steps": len(steps),
        "mean_step_ms": sum(step_ms) / len(step_ms) if step_ms else None,
        "step_ms": step_ms,
        "device_time_available": on_device,
        "device_busy_share": (busy_share([(k.time_range.start, k.time_range.end) for k in kernels], span)
                              if on_device and span is not None else None),
        "kernels_per_step": len(kernels) / count if on_device else None,
        "device_copies": ({"calls": len(copies), "us": sum(c.time_range.end - c.time_range.start for c in copies)}
                          if on_device else None),
        "host_calls": host_calls(operators),
        "top_by_self_cpu": operator_rows(operators, "self_cpu_us", on_device),
        "top_by_self_device": operator_rows(operators, "self_device_us", on_device) if on_device else None,
        "top_kernels": ([{"name": clip(k["name"]), "calls": k["calls"], "device_us": k["self_device_us"]}
                         for k in top(operator_totals(kernels), "self_device_us", TOP_KERNELS)]
                        if on_device else None),
        "self_cpu_us_total": sum(o["self_cpu_us"] for o in operators),
        "self_device_us_total": sum(o["self_device_us"] for o in operators) if on_device else None,
    }


def device_activity(event) -> str | None:
    """"kernel" or "copy" (a copy or fill) for work on the device; None for host events, and for the
    ranges and synchronisations the profiler also marks on the device's timeline, which are not work."""
    from torch.autograd import DeviceType

    if event.device_type == DeviceType.CPU:
        return None
    kind = getattr(event, "activity_type", None)  # Kineto's: kernel, gpu_memcpy, gpu_user_annotation, ...
    if kind:
        return {"kernel": "kernel", "gpu_memcpy": "copy", "gpu_memset": "copy"}.get(kind)
    return "copy" if event.name.startswith(DEVICE_COPIES) else "kernel"


def step_ranges(events: Iterable) -> dict[int, tuple[float, float]]:
    """{N: (start, end)} in µs of each recorded ProfilerStep#N range (torch names them ProfilerStep*
    in `name`, and keeps the number in `trace_name`)."""
    ranges = {}
    for event in events:
        match = re.fullmatch(r"ProfilerStep#(\d+)", getattr(event, "trace_name", None) or "")
        if match:
            ranges[int(match.group(1))] = (event.time_range.start, event.time_range.end)
    return ranges


def operator_totals(events: Iterable) -> list[dict[str, Any]]:
    """Calls and µs per event name (what torch's key_averages gives, over the events chosen here)."""
    totals: dict[str, dict[str, Any]] = {}
    for event in events:
        row = totals.setdefault(event.name, {"name": event.name, "calls": 0, "self_cpu_us": 0.0, "total_cpu_us": 0.0,
                                             "self_device_us": 0.0, "total_device_us": 0.0})
        row["calls"] += 1
        row["self_cpu_us"] += event.self_cpu_time_total
        row["total_cpu_us"] += event.cpu_time_total
        row["self_device_us"] += event.self_device_time_total
        row["total_device_us"] += event.device_time_total
    return list(totals.values())


def top(rows: list[dict[str, Any]], key: str, count: int) -> list[dict[str, Any]]:
    return sorted(rows, key=lambda row: -row[key])[:count]


def busy_share(intervals: Sequence[tuple[float, float]], span: tuple[float, float]) -> float:
    """The share of `span` covered by at least one of `intervals` (kernels that overlap count once;
    what lies outside the span, such as a kernel still running from the step before, is cut off)."""
    start, end = span
    if end <= start:
        raise ValueError(f"the profiled steps span nothing: {span}")
    covered, reach = 0.0, start
    for left, right in sorted(intervals):
        left, right = max(left, reach), min(right, end)
        if right > left:
            covered += right - left
            reach = right
    return covered / (end - start)


def host_calls(operators: Iterable[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Calls and µs (their whole time, what they called included) of each HOST_CALLS name, by prefix;
    zeros where none ran."""
    found = {name: {"calls": 0, "us": 0.0} for name in HOST_CALLS}
    for operator in operators:
        prefix = next((name for name in HOST_CALLS if operator["name"].startswith(name)), None)
        if prefix is not None:
            found[prefix]["calls"] += operator["calls"]
            found[prefix]["us"] += operator["total_cpu_us"]
    return found


def operator_rows(operators: list[dict[str, Any]], key: str, on_device: bool) -> list[dict[str, Any]]:
    """The TOP_OPERATORS rows by `key`; device times None where there are none to give (a CPU run)."""
    return [{**row, "name": clip(row["name"]),
             **({} if on_device else {"self_device_us": None, "total_device_us": None})}
            for row in top(operators, key, TOP_OPERATORS)]


def clip(name: str, width: int = 300) -> str:
    """Kernel names run to thousands of characters of C++ templates; their start says which kernel."""
    return name if len(name) <= width else name[: width - 3] + "..."


# ----------------------------------------------------------------------------------------------
# Files and console


def write_profile(directory: Path, record: dict[str, Any]) -> None:
    """NAME.txt and NAME.json, and the run added to summary.json (read, updated, replaced whole, so
    that a run cut short leaves the runs before it readable)."""
    directory.mkdir(parents=True, exist_ok=True)
    name = record["name"]
    replace_file(directory / f"{name}.json", json.dumps(record, indent=2) + "\n")
    replace_file(directory / f"{name}.txt", profile_table(record))
    summary_path = directory / SUMMARY
    try:
        summary = json.loads(summary_path.read_text())
    except (OSError, ValueError):
        summary = {}
    runs = {**summary.get("runs", {}), name: record}
    replace_file(summary_path, json.dumps({"runs": runs}, indent=2) + "\n")


def replace_file(path: Path, text: str) -> None:
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text)
    os.replace(partial, path)


def profile_table(record: dict[str, Any]) -> str:
    """NAME.txt: the figures, then the operator tables."""
    schedule = record["schedule"]
    steps = record["optimizer_steps"]
    lines = [f"profile {record['name']} on {record['device']}: torch.profiler over optimizer steps "
             f"{', '.join(map(str, steps)) or 'none'} (schedule: wait {schedule['wait']}, warmup "
             f"{schedule['warmup']}, active {schedule['active']})",
             f"steps profiled: {record['profiled_steps']}; mean step wall time: "
             f"{fmt(record['mean_step_ms'], '{:.2f} ms')}"]
    if record["device_time_available"]:
        lines += [f"GPU busy (kernels running) in {fmt(record['device_busy_share'], '{:.1%}')} of the steps' wall time",
                  f"kernels launched a step: {record['kernels_per_step']:.0f}",
                  f"device copies and fills: {record['device_copies']['calls']} calls, "
                  f"{record['device_copies']['us']:,.0f} us"]
    else:
        lines.append("GPU busy: not measured (a CPU run has no device timeline)")
    lines += ["", "host calls that wait for the GPU or feed it (all profiled steps):",
              f"  {'name':32}{'calls':>10}{'us':>14}"]
    lines += [f"  {name:32}{calls['calls']:>10}{calls['us']:>14,.0f}" for name, calls in record["host_calls"].items()]
    lines += ["", f"top {TOP_OPERATORS} operators by self CPU time:", *operator_table(record["top_by_self_cpu"])]
    lines += ["", f"top {TOP_OPERATORS} operators by self device time:"]
    if record["top_by_self_device"] is None:
        lines.append("  not available: a CPU run has no device time")
    else:
        lines += operator_table(record["top_by_self_device"])
        lines += ["", f"top {TOP_KERNELS} kernels by device time:",
                  *(f"  {k['device_us']:>12,.0f} us {k['calls']:>7} calls  {k['name'][:120]}"
                    for k in record["top_kernels"])]
    return "\n".join(lines) + "\n"


def operator_table(rows: list[dict[str, Any]]) -> list[str]:
    header = f"  {'operator':60}{'calls':>8}{'self CPU us':>14}{'CPU us':>14}{'self dev us':>14}{'dev us':>14}"
    return [header] + [f"  {row['name'][:60]:60}{row['calls']:>8}{row['self_cpu_us']:>14,.0f}"
                       f"{row['total_cpu_us']:>14,.0f}{fmt(row['self_device_us'], '{:,.0f}'):>14}"
                       f"{fmt(row['total_device_us'], '{:,.0f}'):>14}" for row in rows]


def fmt(value: float | None, form: str) -> str:
    return "n/a" if value is None else form.format(value)


def describe(record: dict[str, Any]) -> str:
    """The console's line for one profile: step time, busy share, the top operators."""
    on_device = record["device_time_available"]
    rows, key, total = ((record["top_by_self_device"], "self_device_us", record["self_device_us_total"]) if on_device
                        else (record["top_by_self_cpu"], "self_cpu_us", record["self_cpu_us_total"]))
    leaders = ", ".join(f"{row['name'][:40]} {row[key] / max(total, 1):.0%}" for row in rows[:CONSOLE_OPERATORS])
    busy = (f"GPU busy {fmt(record['device_busy_share'], '{:.1%}')}, {record['kernels_per_step']:.0f} kernels a step"
            if on_device else "GPU busy n/a on the CPU")
    return (f"profile {record['name']}: {record['profiled_steps']} steps of "
            f"{fmt(record['mean_step_ms'], '{:.1f} ms')}, "
            f"{busy}; top by self {'device' if on_device else 'CPU'} time: {leaders or 'none'}")


def brief(record: dict[str, Any]) -> dict[str, Any]:
    """What the bench's results JSON keeps of a profile: the figures and the top operators' names."""
    on_device = record["device_time_available"]
    rows, key = ((record["top_by_self_device"], "self_device_us") if on_device
                 else (record["top_by_self_cpu"], "self_cpu_us"))
    keep = ("profiled_steps", "mean_step_ms", "device_busy_share", "kernels_per_step", "host_calls")
    return {**{k: record[k] for k in keep}, "top": [{"name": row["name"], key: row[key]}
                                                    for row in rows[:CONSOLE_OPERATORS]]}
