"""Where a training step's time goes, and how much memory it holds.

`lap(name)` closes a phase that began at the previous lap (or at `start()`): `data` (collating and
copying the batch), `forward_backward`, `optimizer` (clipping, the update, zeroing). On a CPU a lap
reads the wall clock. On a GPU it records a CUDA event instead, so the loop never waits for the device
to measure it; the events are resolved when `read()` is called at a logging step, where the loop
synchronises anyway.
"""

from __future__ import annotations

import resource
import sys
import time
from collections import defaultdict

import torch

PHASES = ("data", "forward_backward", "optimizer")


class StepClock:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.pending: list[tuple[str, object, object]] = []  # (phase, start, end): events or floats
        self.last: object = None
        self.total: dict[str, float] = defaultdict(float)

    def _now(self) -> object:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def start(self) -> None:
        self.last = self._now()

    def lap(self, phase: str) -> None:
        now = self._now()
        self.pending.append((phase, self.last, now))
        self.last = now

    def read(self) -> dict[str, float]:
        """Seconds per phase since the last read, and the memory peaks so far."""
        if self.cuda and self.pending:
            self.pending[-1][2].synchronize()
        seconds = dict.fromkeys(PHASES, 0.0)
        for phase, start, end in self.pending:
            seconds[phase] += start.elapsed_time(end) / 1000 if self.cuda else end - start
        self.pending.clear()
        for phase, value in seconds.items():
            self.total[phase] += value
        return {f"{phase}_seconds": value for phase, value in seconds.items()} | peak_memory(self.cuda)

    def summary(self) -> dict[str, float]:
        """Seconds per phase over the run, their shares, and the memory peaks."""
        spent = sum(self.total.values()) or 1.0
        return ({f"{phase}_seconds": self.total[phase] for phase in PHASES}
                | {f"{phase}_share": self.total[phase] / spent for phase in PHASES}
                | peak_memory(self.cuda))


def peak_memory(cuda: bool) -> dict[str, float]:
    """Peak host RSS of this process, and peak GPU memory allocated and reserved, in GiB."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    peaks = {"peak_host_rss_gib": rss / (2**30 if sys.platform == "darwin" else 2**20)}
    if cuda:
        peaks["peak_gpu_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        peaks["peak_gpu_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    return peaks
