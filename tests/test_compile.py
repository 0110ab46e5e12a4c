"""`train.compile`: the model's repeated blocks compiled in place train as the eager model does, and the
graphs compiled over an epoch of changing batch shapes stay few."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny
from dsum import compiling
from dsum.cli import train_and_evaluate
from dsum.train import train
from test_train import assert_same_weights, losses, metric_rows

# No dropout: compiled code draws its own masks, so only then do the two runs compute the same thing.
NO_DROPOUT = {"t5-full": ["model.architecture.dropout_rate=0.0"], "llama-full": []}


@pytest.mark.parametrize("name", ["t5-full", "llama-full"])
def test_compiled_blocks_train_as_the_eager_model(tmp_path, name):
    """Inductor, as users run it, in fp32, batches padded alike: the same losses within 1e-5 and weights
    within 1e-4. Inductor's fused kernels round differently (1e-8), and Adam scales a near-zero
    gradient's update up to the learning rate whatever its rounding: a small rate keeps that below both."""
    common = ["train.max_steps=3", "train.per_device_batch_size=4", "train.gradient_accumulation_steps=2",
              "train.pad_to_multiple_of=64", "train.learning_rate=1e-4", *NO_DROPOUT[name]]
    eager = train(tiny(name, tmp_path / "eager", *common)).parent
    compiled = train(tiny(name, tmp_path / "compiled", *common, "train.compile=true")).parent
    assert losses(compiled) == pytest.approx(losses(eager), abs=1e-5)
    assert_same_weights(eager, compiled, atol=1e-4)
    assert all(r["compiled_graphs"] >= 1 for r in metric_rows(compiled))
    assert "compiled_graphs" not in metric_rows(eager)[0]


def test_graphs_compiled_over_an_epoch_of_changing_shapes_stay_few(tmp_path, monkeypatch):
    """One epoch of length-grouped batches under a token budget: every step has other shapes. T5's blocks
    run four variants of their code (the first block of each stack computes the position bias; encoder
    and decoder blocks differ), each compiled at most twice (as first seen, then with dynamic sizes),
    and nothing more compiles in validation and generation after the loop. The backend does not change
    what is compiled when, only how: aot_eager here, which skips inductor's code generation."""
    monkeypatch.setattr(compiling, "BACKEND", "aot_eager")
    recipe = tiny("t5-full", tmp_path / "run", "train.compile=true", "train.num_epochs=1", "train.logging_steps=2",
                  "train.group_by_length=true", "train.max_tokens_per_batch=1024", "eval.after_training=true",
                  "eval.max_new_tokens=4", *NO_DROPOUT["t5-full"])
    run = train_and_evaluate(recipe).parent
    rows = metric_rows(run)
    shapes = {r["processed_tokens_per_second"] / r["tokens_per_second"] for r in rows}
    assert len(rows) >= 5 and len(shapes) >= 5  # the padding, and so the shapes, change from record to record
    graphs = [r["compiled_graphs"] for r in rows]
    assert graphs == sorted(graphs) and graphs[-1] <= 4 * 2, graphs
    assert json.loads((run / "run.json").read_text())["telemetry"]["compiled_graphs"] == graphs[-1]
    assert (run / "eval" / "metrics.json").is_file()


def test_the_blocks_are_the_stacks_layers_and_run_eagerly_when_asked():
    from transformers import T5Config, T5ForConditionalGeneration

    model = T5ForConditionalGeneration(T5Config(vocab_size=50, d_model=16, d_ff=32, d_kv=8, num_heads=2, num_layers=3,
                                                num_decoder_layers=2))
    blocks = compiling.stack_blocks(model)
    assert blocks == [*model.encoder.block, *model.decoder.block]  # not T5Block.layer, a list of three kinds
    compiled = compiling.CompiledBlocks(model, backend="eager")
    ids = torch.tensor([[3, 4, 5]])
    model(input_ids=ids, decoder_input_ids=ids, use_cache=False)
    seen = compiled.graphs
    assert seen >= 1
    with compiled.eager():
        model(input_ids=torch.tensor([[3, 4, 5, 6, 7]]), decoder_input_ids=ids, use_cache=False)
    assert compiled.graphs == seen  # uncompiled: nothing new to compile
    with pytest.raises(ValueError, match="has no run of identical blocks"):
        compiling.CompiledBlocks(torch.nn.Linear(2, 2))
