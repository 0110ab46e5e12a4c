"""Real multi-process runs, launched the way users launch them: two-rank DDP with torchrun, and
ZeRO-2 / ZeRO-3 through `accelerate launch` with the repository's own config files."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, tiny
from dsum.train import train

pytestmark = pytest.mark.slow

RECIPE = ROOT / "recipes" / "tiny" / "t5-full.yaml"
COMMON = ["data.synthetic.train_size=64", "data.synthetic.validation_size=8", "eval.after_training=false",
          "train.logging_steps=1", "tokenizer.vocab_size=400", "train.max_steps=4", "train.lr_scheduler=linear",
          "train.warmup_steps=1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(command: list[str], output_dir: Path, *overrides: str, env: dict[str, str] | None = None) -> None:
    full = [sys.executable, "-m", *command, "-m", "dsum", "train", str(RECIPE), *COMMON, *overrides,
            f"output_dir={output_dir}"]
    result = subprocess.run(full, cwd=output_dir.parent, env={**os.environ, **(env or {})},
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def losses(output_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.fixture(scope="module")
def single_rank(tmp_path_factory) -> Path:
    """The reference: one process with twice the per-device batch of the two-rank runs."""
    out = tmp_path_factory.mktemp("single") / "run"
    train(tiny("t5-full", out, *COMMON[4:], "train.per_device_batch_size=4"))
    return out


def assert_matches(run: Path, reference: Path, atol: float) -> None:
    assert json.loads((run / "run.json").read_text())["world_size"] == 2
    assert losses(run) == pytest.approx(losses(reference), abs=atol)
    ours, theirs = load_file(run / "final" / "model.safetensors"), load_file(reference / "final" / "model.safetensors")
    # DeepSpeed's gathered state dict keeps tied embeddings as separate copies: compare every reference tensor.
    assert theirs.keys() <= ours.keys()
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], atol=atol, rtol=0, msg=key)


def test_two_rank_ddp_equals_one_rank_with_twice_the_batch(tmp_path, single_rank):
    out = tmp_path / "ddp"
    launch(["torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())], out,
           "train.per_device_batch_size=2", env={"ACCELERATE_USE_CPU": "true"})
    run = json.loads((out / "run.json").read_text())
    assert run["launch"]["distributed_type"] == "DistributedType.MULTI_CPU"
    assert_matches(out, single_rank, atol=1e-5)


@pytest.mark.parametrize("config", ["zero2", "zero3"])
def test_deepspeed_zero_with_the_shipped_configs(tmp_path, single_rank, config):
    out = tmp_path / config
    # Under ZeRO-3 the run also evaluates: final/ is loaded again, sharded by a new engine, and generated from.
    evaluating = ["eval.after_training=true", "data.synthetic.test_size=6", "eval.max_new_tokens=4"]
    launch(["accelerate.commands.launch", "--config_file", str(ROOT / "accelerate_configs" / f"{config}.yaml"),
            "--num_processes", "2", "--main_process_port", str(free_port())], out, "train.per_device_batch_size=2",
           *(evaluating if config == "zero3" else []))
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "finished"
    assert run["launch"]["deepspeed_config"]["zero_optimization"]["stage"] == int(config[-1])
    assert run["launch"]["deepspeed_config"]["gradient_accumulation_steps"] == 1
    # Each rank trained on its own shard: the result is the single-rank run with twice the batch.
    assert_matches(out, single_rank, atol=1e-4)
    if config == "zero3":
        from transformers import AutoModelForSeq2SeqLM

        model = AutoModelForSeq2SeqLM.from_pretrained(out / "final")  # consolidated: loads as a normal model
        reference = AutoModelForSeq2SeqLM.from_pretrained(single_rank / "final")
        ids = torch.tensor([[5, 6, 7, 1]])
        with torch.no_grad():
            a = model(input_ids=ids, decoder_input_ids=ids).logits
            b = reference(input_ids=ids, decoder_input_ids=ids).logits
        torch.testing.assert_close(a, b, atol=1e-3, rtol=0)
        evaluation = json.loads((out / "eval" / "metrics.json").read_text())
        assert evaluation["world_size"] == 2 and evaluation["n"] == 6
        assert evaluation["model"] == str((out / "final").resolve())


def test_qlora_under_zero3_needs_a_matching_storage_dtype(tmp_path):
    out = tmp_path / "q"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "accelerate_configs" / "zero3.yaml"), "--num_processes", "2", "--main_process_port",
               str(free_port()), "-m", "dsum", "train", str(ROOT / "recipes" / "tiny" / "t5-qlora.yaml"),
               f"output_dir={out}"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "dsum: error: quantization.storage_dtype is uint8 but ZeRO-3 needs it to equal model.dtype (float32)" in result.stderr
    assert not (out / "final").exists()
