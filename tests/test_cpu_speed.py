"""The CPU's speed-ups apply on a CPU alone: a GPU run (or a compiled one, for the dropout) gets none."""

from __future__ import annotations

import torch

from conftest import tiny
from dsum import cpu_speed


def test_only_a_cpu_run_sets_the_hosts_malloc(monkeypatch):
    monkeypatch.undo()  # conftest's stand-in
    calls = []
    monkeypatch.setattr(cpu_speed, "keep_freed_host_memory", lambda: calls.append(1) or True)
    cpu_speed.start_run(torch.device("cuda", 0))
    assert calls == []
    cpu_speed.start_run("cpu")
    assert calls == [1]


def test_dropout_encoder_parts_and_the_growing_cache_stay_off_a_gpu(tmp_path):
    from transformers import T5Config, T5ForConditionalGeneration

    recipe = tiny("t5-full", tmp_path, "eval.encoder_batch_size=4", "model.architecture.dropout_rate=0.1")
    model = T5ForConditionalGeneration(T5Config(vocab_size=50, d_model=16, d_ff=32, d_kv=8, num_heads=2,
                                                num_layers=1, dropout_rate=0.1))
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert cpu_speed.fast_dropout(model, recipe.train, gpu, compiled=False) is None
    assert cpu_speed.fast_dropout(model, recipe.train, cpu, compiled=True) is None
    off = recipe.train.model_copy(update={"fast_cpu_dropout": False})
    assert cpu_speed.fast_dropout(model, off, cpu, compiled=False) is None
    dropout = cpu_speed.fast_dropout(model, recipe.train, cpu, compiled=False)
    assert dropout is not None and dropout.active
    dropout.remove()
    assert cpu_speed.encoder_batch(recipe.eval, cpu, synced_gpus=False) == 4
    assert cpu_speed.encoder_batch(recipe.eval, gpu, synced_gpus=False) is None
    assert cpu_speed.encoder_batch(recipe.eval, cpu, synced_gpus=True) is None
    assert cpu_speed.growing_cache(model, gpu) is None
    assert cpu_speed.growing_cache(model, cpu) is not None
