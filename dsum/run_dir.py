"""The run directory, `output_dir`: the names of what dsum writes there, the only entries it ever deletes, the
lock that keeps one run in a directory at a time, and what state a run there is in (status, complete checkpoints,
what `--resume auto` does). It imports no torch, so that `dsum submit` and the refusals stay fast."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from dsum import distributed
from dsum.config import Recipe, RecipeError, RunError, recipe_to_dict

# The layout of a run's directory:
#
# output_dir/
#   run.json        the run: recipe, versions, status (running, finished, stopped, failed)
#   metrics.jsonl   a line per logging step and per validation
#   tokenizer/      the tokenizer trained on the training split (tokenizer.train)
#   base/           the random-init base (model.architecture), written once
#   checkpoints/    step-NNNNNNNN/, complete once it holds COMPLETE; the newest save_total_limit kept
#   final/          the model or adapter users load
#   eval/           predictions.jsonl and metrics.json (partial/ while generating); step-NNNNNNNN/ holds those
#                   of a checkpoint that `dsum eval --checkpoint` evaluated
#   tensorboard/    the tracker's events
#   slurm/          `dsum submit`'s batch script and the job's logs: never deleted
RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
TOKENIZER_DIR = "tokenizer"
BASE_DIR = "base"
CHECKPOINTS = "checkpoints"
FINAL = "final"
EVAL_DIR = "eval"
TENSORBOARD_DIR = "tensorboard"
SLURM_DIR = "slurm"
MARKER = "COMPLETE"  # in a checkpoint: it was written whole
STATE_FILE = "trainer_state.json"  # in a checkpoint: the step and the batch layout
FINISHED = "finished"
FIRST_STEP = "first_step_at"  # in run.json, once a run has made an optimizer step: it has trained
EVALUATE = "evaluate"  # `--resume auto` of a run that trained and saved final/, but did not finish evaluating
# What may change when a run resumes: how long it trains, how it logs, validates, saves and is tracked,
# how it is compiled, the evaluation after it, and where it is. Anything else would mix two runs: a
# checkpoint's optimizer, schedule and data order were made with its recipe.
MAY_CHANGE_ON_RESUME = ("output_dir", "train.max_steps", "train.num_epochs", "train.logging_steps", "train.eval_steps",
                        "train.eval_max_batches", "train.save_steps", "train.save_total_limit", "train.trackers",
                        "train.compile", "eval")
# What a run writes at the top of output_dir, partial files included: the only entries dsum deletes. Anything
# else in output_dir is the user's (or `dsum submit`'s slurm/), and dsum neither deletes nor changes it:
# `--overwrite` and `--resume auto` remove these and nothing more.
RUN_ENTRIES = (RUN_FILE, RUN_FILE + ".tmp", METRICS_FILE, TOKENIZER_DIR, TOKENIZER_DIR + ".tmp", BASE_DIR,
               BASE_DIR + ".tmp", CHECKPOINTS, FINAL, FINAL + ".tmp", EVAL_DIR, TENSORBOARD_DIR)


def run_entries(output_dir: Path) -> list[Path]:
    """What a run wrote into its directory and a new run replaces."""
    return [output_dir / name for name in RUN_ENTRIES if (output_dir / name).exists()]


def others_entries(output_dir: Path) -> list[Path]:
    """What is in the directory that no run wrote: the user's files, and `dsum submit`'s."""
    return [p for p in output_dir.iterdir() if p.name not in RUN_ENTRIES]


def only_evaluation_left(output_dir: Path) -> bool:
    """A run that trained and saved final/, and stopped or was killed before it finished evaluating."""
    info = read_run(output_dir)
    return bool(info.get("trained")) and info.get("status") != FINISHED and (output_dir / FINAL).is_dir()


def ended_before_training(output_dir: Path) -> bool:
    """A run that failed, stopped or was killed before its first optimizer step (a model that did not load,
    a launch that went wrong): it trained nothing and saved nothing, so a new run may replace it unasked.
    A run from before dsum marked first steps counts as one only if it logged no step either."""
    info = read_run(output_dir)
    metrics = output_dir / METRICS_FILE
    return (bool(info) and info.get("status") != FINISHED and FIRST_STEP not in info and not info.get("trained")
            and not complete_checkpoints(output_dir) and not (metrics.is_file() and metrics.stat().st_size))


def read_run(output_dir: Path) -> dict[str, Any]:
    """run.json's contents, or {} where it does not read."""
    try:
        info = json.loads((output_dir / RUN_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def read_status(run_file: Path) -> str:
    try:
        return json.loads(run_file.read_text()).get("status", "unknown")
    except (OSError, ValueError):
        return "unreadable"


def checkpoint_path(output_dir: Path, step: int) -> Path:
    return output_dir / CHECKPOINTS / f"step-{step:08d}"


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = output_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp") and (p / MARKER).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def auto_resume(output_dir: Path) -> tuple[str | None, bool]:
    """`--resume auto`: (resume, overwrite) for a run that may have started, stopped or finished.

    Nothing there yet: start. A finished run: `FINISHED`, nothing to do. A run that saved `final/` and
    stopped in its evaluation: `EVALUATE`, the evaluation alone (its predictions so far kept). A complete
    checkpoint: continue from the newest. A run that saved none: start it again (its entries alone
    replaced).
    """
    if not (output_dir / RUN_FILE).is_file():
        return None, False
    if read_status(output_dir / RUN_FILE) == FINISHED and (output_dir / FINAL).is_dir():
        return FINISHED, False
    if only_evaluation_left(output_dir):
        return EVALUATE, False
    if complete_checkpoints(output_dir):
        return "latest", False
    return None, True


@contextmanager
def written(target: Path, what: str) -> Iterator[Path]:
    """`target` (a directory) written whole or not at all: the block writes into `target.tmp`, which is
    renamed over `target` when it ends. Any failure on the way (a full disk raises OSError, safetensors
    raises its own error) removes the partial directory and ends the run with one line."""
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        yield tmp
    except Exception as err:  # noqa: BLE001 - whatever a writer raises, the partial directory goes
        shutil.rmtree(tmp, ignore_errors=True)
        raise RunError(f"could not write {what} in {target.parent}: {write_failure(err)}") from None
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)


def write_failure(err: BaseException) -> str:
    """Why a write failed, in a few words: the system's reason for an OSError, else the error's first line."""
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200]}" if text else type(err).__name__


class Lock:
    """output_dir held by one run: an exclusive `flock` on the directory itself (no file is made), which
    the kernel drops when the process ends, however it ends."""

    def __init__(self, output_dir: Path):
        self.output_dir = output_dir
        self.fd: int | None = None

    def acquire(self) -> bool:
        """True if this process holds the directory now (it is made if missing), False if another does."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.output_dir, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self.fd = fd
        return True

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the lock
            self.fd = None

    def __enter__(self) -> Lock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def check_writable(output_dir: Path) -> None:
    """output_dir is a directory dsum can write in, or one it can make: its nearest existing part is one."""
    existing = next((p for p in (output_dir, *output_dir.parents) if p.exists()), Path("."))
    if not existing.is_dir():
        where = "is a file" if existing == output_dir else f"cannot be made: {existing} is a file"
        raise RecipeError(f"output_dir {output_dir} {where}; expected a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "" if existing == output_dir else f" (in {existing})"
        raise RecipeError(f"output_dir {output_dir}: no permission to write there{where}; choose another output_dir")


def claim(output_dir: Path, *, resuming: bool, overwrite: bool) -> Lock:
    """Before a run writes into output_dir: hold it, refuse what may not be replaced, and with
    `overwrite` delete the previous run's entries (`RUN_ENTRIES`, nothing else). Rank 0 holds the lock;
    every rank reaches the same verdict before any rank writes. Release the lock when the run ends."""
    lock = Lock(output_dir)
    held = lock.acquire() if distributed.is_main() else True
    if distributed.sum_all([not held])[0]:
        raise RecipeError(f"output_dir {output_dir} is in use by another dsum run (it holds the directory's lock); "
                          "wait for it to end, or choose another output_dir")
    try:
        problem = None if resuming else output_dir_problem(output_dir, overwrite)
        replace = not resuming and (overwrite or ended_before_training(output_dir))
        distributed.barrier()
        if problem:
            raise RecipeError(problem)
        if replace and distributed.is_main():
            if not overwrite:
                info = read_run(output_dir)
                print(f"output_dir {output_dir}: replacing a {info.get('status')} run that ended before its first step"
                      + (f" ({info['failure']})" if info.get("failure") else ""), flush=True)
            for entry in run_entries(output_dir):
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        distributed.barrier()
    except BaseException:
        lock.release()
        raise
    return lock


def output_dir_problem(output_dir: Path, overwrite: bool) -> str | None:
    """Why a new run may not start in output_dir, or None: a directory of someone else's files, or a run
    there that the user has not asked to replace."""
    if not output_dir.exists() or not [p for p in output_dir.iterdir() if p.name != SLURM_DIR]:
        return None
    run_file = output_dir / RUN_FILE
    if not run_file.is_file():
        return f"output_dir {output_dir} is not empty and holds no dsum run; choose another output_dir"
    if overwrite or ended_before_training(output_dir):
        return None
    status = read_status(run_file)
    if status == FINISHED:
        hint = ""
    elif only_evaluation_left(output_dir):
        hint = "it trained but did not finish its evaluation: pass --resume latest to finish that, or "
    elif complete_checkpoints(output_dir):
        hint = "pass --resume latest to continue it, or "
    else:  # stopped or crashed before its first checkpoint
        hint = "it saved no checkpoint to resume from; "
    return f"output_dir {output_dir} already holds a {status} run; {hint}pass --overwrite to replace it"


def check_resumed_recipe(saved: dict[str, Any], recipe: Recipe, checkpoint: Path) -> None:
    """A resumed run trains on with the recipe its checkpoint was made with (`trainer_state.json` keeps it):
    refuse a change outside MAY_CHANGE_ON_RESUME, naming the key. Checkpoints from before dsum kept the
    recipe are taken as they are."""
    if "recipe" not in saved:
        return
    before, now = flat(saved["recipe"]), flat(recipe_to_dict(recipe))
    for key in dict.fromkeys([*now, *before]):
        allowed = any(key == k or key.startswith(k + ".") for k in MAY_CHANGE_ON_RESUME)
        if not allowed and before.get(key) != now.get(key):
            raise RecipeError(f"--resume {checkpoint}: {key} is {now.get(key)!r} here, but the checkpoint trained with "
                              f"{before.get(key)!r}; a resumed run keeps its recipe, so resume without changing it, "
                              "or start a new run (--overwrite, or another output_dir). What may change on resume: "
                              "train.max_steps and num_epochs, the logging, validation, saving and tracker settings, "
                              "train.compile, eval.* and output_dir")


def flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A recipe as dotted keys: {"train.learning_rate": 1e-4, "model.architecture.num_layers": 2, ...}."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
