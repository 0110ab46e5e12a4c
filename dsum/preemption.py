"""Stop cleanly on SIGUSR1, SIGTERM or Ctrl-C: finish the current step, save, exit, resume later."""

from __future__ import annotations

import signal
import threading
from types import FrameType

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)


class Stopped(Exception):
    """The run stopped on a signal after saving its progress; running the same command continues it. `by`
    names the signal, or says it reached another process."""

    def __init__(self, message: str, by: str) -> None:
        super().__init__(message)
        self.by = by


class StopSignals:
    """Record SIGUSR1, SIGTERM and SIGINT while the block runs; restore the previous handlers after it.

    SLURM sends SIGUSR1 some time before a job's limit (`--signal=USR1@SECONDS`) and SIGTERM when it preempts
    or cancels one; a person at the terminal presses Ctrl-C (SIGINT). The handler only records the signal; the
    training loop and the generator vote at their step boundaries, in the all-reduce they already make, so all
    ranks stop at the same step even when the signal reached only some of them. A second Ctrl-C does not wait:
    it interrupts at once (KeyboardInterrupt), and the command ends in one line.
    """

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # Python allows handlers only there
            for sig in STOP_SIGNALS:
                # A shell starts a background job with Ctrl-C ignored, so that it reaches the foreground alone.
                if sig == signal.SIGINT and signal.getsignal(sig) == signal.SIG_IGN:
                    continue
                self._previous[sig] = signal.signal(sig, self._record)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _record(self, signum: int, frame: FrameType | None) -> None:
        # Only record: printing here could re-enter a write the signal interrupted.
        if signum == signal.SIGINT and self.received == "SIGINT":
            raise KeyboardInterrupt  # Ctrl-C twice: the person will not wait for the step to end
        self.received = self.received or signal.Signals(signum).name

    @property
    def by(self) -> str:
        """Who stopped the run, as run.json says it: the signal this process received, if any."""
        return self.received or "a signal to another process"

    def vote(self) -> int:
        """This process's vote for stopping, to be summed over ranks with the step's other counts."""
        return int(self.received is not None)
