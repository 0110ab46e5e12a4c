"""Shared fixtures: tiny recipes with small overrides, a trained-tokenizer cache, and a clean Accelerate state."""

from __future__ import annotations

import os
from pathlib import Path

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


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each test builds its own Accelerator; Accelerate keeps process-wide state that must not leak."""
    yield
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    PartialState._reset_state()
