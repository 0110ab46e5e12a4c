"""`train.max_tokens_per_batch: auto`: the largest budget that fits, found by trials that back off on
out-of-memory, kept in run.json and the checkpoints, and taken again on resume."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import tiny
from dsum import sizing
from dsum.config import RunError
from dsum.loss import TokenLoss
from dsum.train import train
from test_train import losses


@pytest.mark.parametrize("limit", [250, 1000, 4321, 30000])
def test_the_budget_is_the_largest_trial_that_fitted_less_a_margin(limit):
    tried = []

    def fits(budget):
        tried.append(budget)
        return budget <= limit

    budget = sizing.auto_budget(fits, unit=100, cap=20000, multiple=1)
    largest = max(b for b in tried if b <= limit)
    assert budget == max(100, int(largest * sizing.MARGIN) // 64 * 64)
    assert budget <= limit and all(b <= 20000 for b in tried)
    if limit < 20000:  # the trials bisected towards the limit: within an eighth of the doubling's step
        assert largest >= limit * (1 - 1 / 8) - 100
    assert len(tried) <= 3 + 8 + sizing.BISECTIONS


def test_an_example_that_does_not_fit_alone_is_a_clear_error():
    with pytest.raises(RunError, match="one example of 300 tokens does not fit on the device even alone"):
        sizing.auto_budget(lambda budget: False, unit=300, cap=10000, multiple=64)


def simulate_memory(monkeypatch, limit: int) -> None:
    """A device with memory for `limit` tokens a micro-batch: a larger forward runs out of memory, as a GPU's would."""
    call = TokenLoss.__call__

    def limited(self, model, batch, *args, **kwargs):
        tokens = batch["input_ids"].numel() + (batch["labels"].numel() if "decoder_input_ids" in batch else 0)
        if tokens > limit:
            raise torch.OutOfMemoryError(f"simulated: {tokens} tokens > {limit}")
        return call(self, model, batch, *args, **kwargs)

    monkeypatch.setattr(TokenLoss, "__call__", limited)
    monkeypatch.setattr(sizing, "device_memory", lambda device: True)


def test_auto_sizes_the_batches_to_the_device_and_a_resume_keeps_them(tmp_path, monkeypatch, capsys):
    simulate_memory(monkeypatch, 3000)
    common = ["train.max_tokens_per_batch=auto", "train.max_steps=4", "train.save_steps=2"]
    out = tmp_path / "run"
    train(tiny("t5-full", out, *common))
    run = json.loads((out / "run.json").read_text())
    budget = run["max_tokens_per_batch"]
    assert 3000 * sizing.MARGIN / 2 <= budget <= 3000 and budget % 64 == 0
    assert f"train.max_tokens_per_batch: auto: {budget:,} tokens a micro-batch (the largest that fitted" in (
        capsys.readouterr().out)
    state = json.loads((out / "checkpoints" / "step-00000002" / "trainer_state.json").read_text())
    assert state["max_tokens_per_batch"] == budget

    # On a device with room for more, a resumed run keeps the checkpoint's batches, and ends as the first did.
    simulate_memory(monkeypatch, 100000)
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    shutil.rmtree(resumed / "final")
    train(tiny("t5-full", resumed, *common), resume="latest")
    assert "the checkpoint's, to cut the batches as before" in capsys.readouterr().out
    assert json.loads((resumed / "run.json").read_text())["max_tokens_per_batch"] == budget
    assert losses(resumed) == pytest.approx(losses(out), abs=1e-6)


def test_without_device_memory_auto_takes_the_batch_size_in_tokens(tmp_path, capsys):
    out = tmp_path / "run"
    train(tiny("llama-full", out, "train.max_tokens_per_batch=auto", "train.max_steps=1",
               "train.per_device_batch_size=4"))
    budget = json.loads((out / "run.json").read_text())["max_tokens_per_batch"]
    assert budget % 64 == 0 and budget >= 4 * 30
    assert "no device memory to size against: 4 examples' worth on average" in capsys.readouterr().out
