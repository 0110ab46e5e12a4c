"""Injected faults, for tests of what survives a crash: off unless `DSUM_FAULT` is set.

    DSUM_FAULT=checkpoint.save:kill@4      SIGKILL this process in the middle of saving step 4
    DSUM_FAULT=checkpoint.save:oserror     an OSError (no space left) while saving any checkpoint

A fault names a point in the code, an action (`kill` or `oserror`) and, optionally, the step.
"""

from __future__ import annotations

import errno
import os
import signal

ENV = "DSUM_FAULT"
ACTIONS = ("kill", "oserror")


def point(name: str, step: int | None = None) -> None:
    """Trigger the fault the environment names for this point (and step), if any."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    where, _, rest = spec.partition(":")
    action, _, at = rest.partition("@")
    if action not in ACTIONS:
        raise ValueError(f"{ENV}={spec}: the action must be one of {', '.join(ACTIONS)}")
    if where != name or (at and step != int(at)):
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (injected by {ENV})")
