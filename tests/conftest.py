"""Shared fixtures: tiny recipes with small overrides, the `dsum` command run in this process, and a clean
Accelerate state."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import warnings
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from unittest import mock

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The DialogSum files (train/validation/test .jsonl); its license keeps them out of the repository.
DIALOGSUM = Path(os.environ.get("DSUM_DIALOGSUM_DIR", ROOT.parent / "shared" / "data" / "dialogsum"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def tiny(name: str, output_dir: Path, *overrides: str):
    """A tiny recipe from recipes/tiny with a small synthetic corpus, writing into output_dir."""
    from dsum.config import load_recipe

    base = ["data.synthetic.train_size=64", "data.synthetic.validation_size=8", "data.synthetic.test_size=5",
            "eval.after_training=false", "train.logging_steps=1", "tokenizer.vocab_size=400",
            f"output_dir={output_dir}"]
    return load_recipe(ROOT / "recipes" / "tiny" / f"{name}.yaml", [*base, *overrides])


def run_dsum(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`dsum ARGS` in this process, through the command's `main`: its exit status, stdout and stderr.

    It spares the seconds a new interpreter spends importing torch and transformers. What only a process
    of its own shows (the entry point, signals, kills, launchers, settings read at import) is tested by
    starting one. The environment, warning filters, logging handlers and Accelerate's state are given
    back afterwards (glibc's malloc settings, which cannot be, are never set in pytest's process: see
    `malloc_left_alone`)."""
    from dsum import cli

    # UTF-8 streams, as a process's pipes are here (tqdm draws its bars in ASCII on a stream without an encoding).
    out, err = (io.TextIOWrapper(io.BytesIO(), encoding="utf-8", write_through=True) for _ in range(2))
    handlers = logging.root.handlers[:]
    with (mock.patch.dict(os.environ, env or {}), warnings.catch_warnings(),
          redirect_stdout(out), redirect_stderr(err)):
        try:
            status = cli.main(list(args))
        except SystemExit as exit:  # argparse's usage errors
            status = exit.code
        finally:
            logging.root.handlers[:] = handlers
            reset_accelerate_state()
    return subprocess.CompletedProcess(["dsum", *args], status, *(s.buffer.getvalue().decode() for s in (out, err)))


def reset_accelerate_state() -> None:
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    PartialState._reset_state()


@pytest.fixture(autouse=True)
def malloc_left_alone(monkeypatch):
    """A CPU run sets glibc's malloc for the whole process, which nothing can undo: not in pytest's process,
    where every test after would run with it. tests/test_cli.py and tests/test_cpu_speed.py check the
    setting and where it is made, in processes of their own or with the call recorded."""
    from dsum import cpu_speed

    monkeypatch.setattr(cpu_speed, "keep_freed_host_memory", lambda: False)


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each test builds its own Accelerator; Accelerate keeps process-wide state that must not leak."""
    yield
    reset_accelerate_state()
