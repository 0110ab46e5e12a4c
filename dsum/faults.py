"""Injected faults, for tests of what survives a crash: off unless `DSUM_FAULT` is set."""

from __future__ import annotations

import errno
import os
import signal

ENV = "DSUM_FAULT"
ACTIONS = ("kill", "term", "int", "oserror", "nan")
SIGNALS = {"kill": signal.SIGKILL, "term": signal.SIGTERM, "int": signal.SIGINT}


def point(name: str, step: int | None = None) -> None:
    """Signal this process, or raise an OSError, if the environment names this point (and step)."""
    action = armed(name, step)
    if action in SIGNALS:
        os.kill(os.getpid(), SIGNALS[action])
    if action == "oserror":
        raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (injected by {ENV})")


def poisoned(value, name: str, step: int):
    """The value, or NaN times it if the environment names this point and step."""
    return value * float("nan") if armed(name, step) == "nan" else value


def armed(name: str, step: int | None) -> str | None:
    """The action the environment sets for this point and step, if any.

    A fault names a point in the code, an action (`kill`, `term`, `int`, `oserror` or `nan`) and, optionally,
    the step:

        DSUM_FAULT=checkpoint.save:kill@4      SIGKILL this process in the middle of saving step 4
        DSUM_FAULT=checkpoint.save:oserror     an OSError (no space left) while saving any checkpoint
        DSUM_FAULT=train.loss:nan@6            the loss of optimizer step 6 becomes NaN
        DSUM_FAULT=train.step:kill@7           SIGKILL right after optimizer step 7
        DSUM_FAULT=generate.batch:kill@3       SIGKILL after the third generation batch is written
        DSUM_FAULT=generate.batch:term@2       SIGTERM (as SLURM preempts) after the second generation batch
        DSUM_FAULT=train.step:int@3            SIGINT (Ctrl-C) right after optimizer step 3
    """
    spec = os.environ.get(ENV)
    if not spec:
        return None
    where, _, rest = spec.partition(":")
    action, _, at = rest.partition("@")
    if action not in ACTIONS:
        raise ValueError(f"{ENV}={spec}: the action must be one of {', '.join(ACTIONS)}")
    return action if where == name and (not at or step == int(at)) else None
