"""FSDP2 launched the way users launch it, `accelerate launch` with the repository's fsdp configs, on two CPU
ranks over gloo: training equals one rank with twice the batch, a resumed run the straight one, and generation
right after a step is the gathered model's."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, tiny
from test_distributed import COMMON, free_port
from test_train import assert_same_weights, losses
from dsum.train import train

pytestmark = pytest.mark.slow

# name: (Accelerate config, overrides of both runs, overrides of the FSDP run alone, the blocks FSDP wraps)
CASES = {
    # Tied embeddings, and validation with generation between steps (T5 calls its encoder apart from the root);
    # the FSDP run then evaluates final/, loaded whole on each rank, the dialogues shared out.
    "t5-full": ("fsdp", ["train.eval_steps=2", "eval.validation_samples=4", "eval.max_new_tokens=8"],
                ["eval.after_training=true", "data.synthetic.test_size=6"], ["T5Block"]),
    # Saves step 2 for the resume test below.
    "t5-lora": ("fsdp", [], ["train.save_steps=2"], ["T5Block"]),
    # Two micro-batches of one per rank: accumulation and the per-token loss across ranks.
    "llama-full": ("fsdp", [], ["train.per_device_batch_size=1", "train.gradient_accumulation_steps=2"],
                   ["LlamaDecoderLayer"]),
    "llama-lora": ("fsdp_offload", ["train.eval_steps=2", "eval.validation_samples=4", "eval.max_new_tokens=8"], [],
                   ["LlamaDecoderLayer"]),
    # 4-bit weights sharded in float32 storage, with a validation between steps (bitsandbytes repacks for the CPU).
    "t5-qlora": ("fsdp", ["quantization.storage_dtype=float32", "train.eval_steps=2", "train.eval_max_batches=1"], [],
                 ["T5Block"]),
}


def launch_fsdp(config: str, recipe: str, output_dir: Path, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "accelerate_configs" / f"{config}.yaml"), "--num_processes", "2", "--main_process_port",
               str(free_port()), "-m", "dsum", "train", str(ROOT / "recipes" / "tiny" / f"{recipe}.yaml"), *COMMON,
               "train.per_device_batch_size=2", *args, f"output_dir={output_dir}"]
    return subprocess.run(command, cwd=output_dir.parent, env={**os.environ, "ACCELERATE_USE_CPU": "true"},
                          capture_output=True, text=True, timeout=600)


def launched(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def records(output_dir: Path, key: str) -> list:
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if key in r]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Each case's run, made once: (the one-rank reference with twice the batch, the two-rank FSDP run)."""
    made: dict[str, tuple[Path, Path]] = {}

    def run(name: str) -> tuple[Path, Path]:
        if name not in made:
            config, both, fsdp_only, _ = CASES[name]
            root = tmp_path_factory.mktemp(name)
            train(tiny(name, root / "single", *COMMON[4:], "train.per_device_batch_size=4", *both))
            launched(launch_fsdp(config, name, root / "fsdp", *both, *fsdp_only))
            made[name] = root / "single", root / "fsdp"
        return made[name]

    return run


@pytest.mark.parametrize("name", list(CASES))
def test_two_ranks_under_fsdp_equal_one_rank_with_twice_the_batch(runs, name):
    config, _, _, blocks = CASES[name]
    single, fsdp = runs(name)
    run, reference = (json.loads((d / "run.json").read_text()) for d in (fsdp, single))
    launch = run["launch"]
    assert launch["distributed_type"] == "DistributedType.FSDP" and launch["accelerate_num_processes"] == 2
    assert run["parameters"] == reference["parameters"]  # 4-bit weights counted as such, not as sharded floats
    # The wrapped blocks come from the model (its _no_split_modules), not from the config file.
    assert launch["fsdp"] == {"version": 2, "reshard_after_forward": True, "offload": config == "fsdp_offload",
                              "state_dict_type": "SHARDED_STATE_DICT", "wrapped_blocks": blocks}
    assert losses(fsdp) == pytest.approx(losses(single), abs=1e-5)
    # The gradient norm before clipping: FSDP's reduce-scatter averages over ranks as DDP does (dsum/train.py).
    norms = [[r["grad_norm"] for r in records(run, "grad_norm")] for run in (fsdp, single)]
    assert norms[0] == pytest.approx(norms[1], rel=1e-4)
    validations = [[r["validation_loss"] for r in records(run, "validation_loss")] for run in (fsdp, single)]
    assert validations[0] == pytest.approx(validations[1], abs=1e-5)
    # final/ is gathered whole: the same files, tied weights stored once, as one process writes them.
    assert sorted(p.name for p in (fsdp / "final").iterdir()) == sorted(p.name for p in (single / "final").iterdir())
    assert_same_weights(fsdp, single, atol=2e-4)  # Adam magnifies the order of FSDP's float sums in the LoRA weights
    if name == "t5-full":
        evaluation = json.loads((fsdp / "eval" / "metrics.json").read_text())
        assert evaluation["world_size"] == 2 and evaluation["n"] == 6 and run["status"] == "finished"


def test_a_run_resumed_under_fsdp_equals_the_straight_run(runs, tmp_path):
    _, straight = runs("t5-lora")  # saved a sharded checkpoint at step 2 and went on
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "final")
    shards = sorted(p.name for p in (resumed / "checkpoints" / "step-00000002").iterdir())
    assert {"pytorch_model_fsdp_0", "optimizer_0", "rng_state_0.pt", "rng_state_1.pt"} <= set(shards)
    result = launch_fsdp("fsdp", "t5-lora", resumed, "train.save_steps=2", "--resume", "latest")
    launched(result)
    assert "resumed from" in result.stdout and "at step 2" in result.stdout
    assert losses(resumed) == pytest.approx(losses(straight), abs=1e-6)
    assert_same_weights(resumed, straight, atol=1e-6)


def test_generation_right_after_a_step_is_the_gathered_model_s(tmp_path):
    """Ranks asking for different lengths (synced_gpus) right after a backward, which leaves the root unit's
    weights sharded: tests/fsdp_generation.py compares with the gathered model on rank 0."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "accelerate_configs" / "fsdp.yaml"), "--num_processes", "2", "--main_process_port",
               str(free_port()), str(ROOT / "tests" / "fsdp_generation.py")]
    result = subprocess.run(command, cwd=tmp_path, env={**os.environ, "ACCELERATE_USE_CPU": "true"},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "generated lengths [4, 8], as the gathered model" in result.stdout


def test_qlora_under_fsdp_needs_a_matching_storage_dtype(tmp_path):
    out = tmp_path / "q"
    result = launch_fsdp("fsdp", "t5-qlora", out)
    assert result.returncode != 0
    message = ("dsum: error: quantization.storage_dtype is uint8 but FSDP needs it to equal model.dtype (float32) "
               "to shard the 4-bit weights; set quantization.storage_dtype to the model dtype\n")
    assert result.stderr.count(message) == 2, result.stderr[-3000:]  # one line from each rank
    assert not out.exists()
