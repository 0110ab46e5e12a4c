"""The `dsum` command as users run it: validate, clear one-line errors with exit 2, and the demo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT


def dsum(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dsum", *args], cwd=cwd or ROOT, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})


@pytest.mark.parametrize("family, masked", [("t5", "Summarize the following conversation."), ("llama", "<s>Summarize")])
def test_validate_shows_the_run_without_training(tmp_path, family, masked):
    out = tmp_path / "never"
    result = dsum("validate", f"recipes/tiny/{family}-lora.yaml", "train.gradient_accumulation_steps=2",
                  "--num-processes", "4", f"output_dir={out}")
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert "world size: 4" in text
    assert "global batch size: 64 (= 8 per device x 2 accumulation x 4 processes)" in text
    assert "training examples: 512; optimizer steps per epoch: 8; optimizer steps: 8" in text
    assert "trainable parameters:" in text and "%" in text
    assert f"[masked] {masked}" in text
    assert "[loss]" in text
    assert "gradient_accumulation_steps: 2" in text  # the resolved recipe
    assert not out.exists()


def test_validate_of_a_hub_recipe_offline_still_checks_the_recipe(tmp_path):
    result = dsum("validate", "recipes/flan-t5-base/lora.yaml", "data.source=synthetic", f"output_dir={tmp_path}/x")
    assert result.returncode == 0, result.stderr
    assert "global batch size: 16" in result.stdout
    assert "parameters and example: not available here" in result.stdout


@pytest.mark.parametrize("args, expected", [
    (["train", "recipes/tiny/t5-full.yaml", "train.learning_rate=-1"], "train.learning_rate: got -1"),
    (["train", "recipes/tiny/t5-full.yaml", "train.learning_rat=1"], "unknown key 'learning_rat' (did you mean train.learning_rate?)"),
    (["train", "recipes/nope.yaml"], "recipe recipes/nope.yaml: no such file"),
    (["validate", "recipes/tiny/t5-full.yaml", "data.source=/no/such/dir"], "/no/such/dir"),
    (["train", "recipes/tiny/t5-full.yaml", "train.mixed_precision=fp16"], "fp16 overflows in T5"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, expected):
    result = dsum(*args, f"output_dir={tmp_path / 'out'}")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("dsum: error:") and expected in lines[-1], result.stderr
    assert "Traceback" not in result.stderr


def test_demo_learns_the_synthetic_corpus(tmp_path):
    """The README's first command: trains and evaluates offline and ends with a ROUGE table."""
    result = dsum("demo", "--output-dir", str(tmp_path / "demo"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| rouge1    |" in result.stdout
    metrics = json.loads((tmp_path / "demo" / "eval" / "metrics.json").read_text())
    assert metrics["rouge1"] >= 0.5
    assert metrics["n"] == 101
    # Run again: a previous demo in the same place is replaced, not refused.
    assert json.loads((tmp_path / "demo" / "run.json").read_text())["demo"] is True


def test_an_untrained_model_scores_far_below_the_demo(tmp_path):
    result = dsum("train", "dsum/demo.yaml", "train.max_steps=1", f"output_dir={tmp_path / 'untrained'}")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "untrained" / "eval" / "metrics.json").read_text())
    assert metrics["rouge1"] < 0.2
