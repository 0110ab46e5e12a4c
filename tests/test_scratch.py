"""recipes/scratch/t5-dialogsum.yaml: a T5 of 30 to 100M parameters trained from scratch on DialogSum; the
same recipe made small learns the real dialogues on a CPU."""

from __future__ import annotations

import json
import re

from conftest import DIALOGSUM, ROOT, run_dsum
from dsum.config import load_recipe
from dsum.train import train

RECIPE = ROOT / "recipes" / "scratch" / "t5-dialogsum.yaml"
# The recipe, cut down to run in seconds: its training, prompt and evaluation settings are kept.
SMALL = ["model.architecture.d_model=64", "model.architecture.d_ff=128", "model.architecture.d_kv=16",
         "model.architecture.num_heads=4", "model.architecture.num_layers=2", "model.architecture.num_decoder_layers=2",
         "tokenizer.vocab_size=1000", "tokenizer.max_source_length=256", "tokenizer.max_target_length=48",
         "data.max_train_samples=384", "train.per_device_batch_size=16", "train.max_steps=24", "train.logging_steps=6",
         "train.learning_rate=3e-3",
         "train.mixed_precision=no", "train.eval_steps=null", "train.save_steps=null", "train.eval_max_batches=2",
         "train.trackers=[]", "eval.after_training=false"]


def test_the_scratch_recipe_is_a_t5_of_30_to_100m_parameters_with_a_tokenizer_of_its_own():
    result = run_dsum("validate", str(RECIPE), f"data.source={DIALOGSUM}")
    assert result.returncode == 0, result.stderr[-2000:]
    trainable = int(re.search(r"trainable parameters: ([\d,]+) of", result.stdout).group(1).replace(",", ""))
    assert 30_000_000 <= trainable <= 100_000_000
    assert "training examples: 12460" in result.stdout  # the whole training split
    recipe = load_recipe(RECIPE)
    assert recipe.model.architecture["model_type"] == "t5" and recipe.model.name_or_path is None
    assert recipe.tokenizer.train and recipe.eval.split == "test" and recipe.eval.max_samples is None


def test_a_small_variant_of_the_scratch_recipe_learns_dialogsum(tmp_path):
    out = tmp_path / "scratch"
    train(load_recipe(RECIPE, [*SMALL, f"data.source={DIALOGSUM}", f"output_dir={out}"]))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 4
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.9 * losses[0], losses
    validation = [r["validation_loss"] for r in rows if "validation_loss" in r]
    assert validation and validation[-1] < losses[0]
    assert json.loads((out / "run.json").read_text())["num_train_examples"] == 384
