"""The `dsum` command as users run it: validate, clear one-line errors with exit 2, the demo, and the
host memory it keeps."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, run_dsum


def dsum(*args: str, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dsum", *args], cwd=cwd or ROOT, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "TOKENIZERS_PARALLELISM": "false", **env})


@pytest.mark.parametrize("family, masked", [("t5", "Summarize the following conversation."), ("llama", "<s>Summarize")])
def test_validate_shows_the_run_without_training(tmp_path, family, masked):
    out = tmp_path / "never"
    result = run_dsum("validate", str(ROOT / "recipes" / "tiny" / f"{family}-lora.yaml"),
                      "train.gradient_accumulation_steps=2", "--num-processes", "4", f"output_dir={out}")
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert "world size: 4" in text
    assert "global batch 64 (8 per device x 2 accumulation steps x 4 processes)" in text
    assert "training examples: 512; optimizer steps per epoch: 8; optimizer steps: 8" in text
    assert "trainable parameters:" in text and "%" in text
    assert f"[masked] {masked}" in text
    assert "[loss]" in text
    assert "gradient_accumulation_steps: 2" in text  # the resolved recipe
    assert not out.exists()


def test_validate_of_a_hub_recipe_offline_still_checks_the_recipe(tmp_path):
    # HF_HUB_OFFLINE=1: the same failure to load as with no network, without huggingface_hub's retries
    # (about 50 s here); the hint that says so is tested in tests/test_errors.py.
    result = dsum("validate", "recipes/flan-t5-base/lora.yaml", "data.source=synthetic", f"output_dir={tmp_path}/x",
                  HF_HUB_OFFLINE="1")
    assert result.returncode == 0, result.stderr
    assert "global batch 16 (" in result.stdout
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


# Commands that load no model, run one after another in a fresh process: does any of them import torch,
# or set DS_ACCELERATOR (which `sbatch` would hand on to the job, GPU or not)?
WITHOUT_A_MODEL = """
import os, sys
from dsum.cli import main
out, predictions = sys.argv[1], sys.argv[2]
statuses = [
    main(["submit", "recipes/tiny/t5-lora.yaml", "--nodes", "2", "--gpus-per-node", "4", "--dry-run",
          f"output_dir={out}"]),
    main(["score", "--predictions", predictions, "--json"]),
    main(["train", "recipes/tiny/t5-lora.yaml", "train.learning_rate=-1", f"output_dir={out}"]),
]
print(statuses, "torch" in sys.modules, os.environ.get("DS_ACCELERATOR"))
"""


def test_commands_that_load_no_model_never_import_torch(tmp_path):
    """`dsum submit` on a login node, `dsum score`, and any recipe error answer without the seconds that
    importing torch takes, and a job submitted from a machine without a GPU is not told it has none."""
    predictions = tmp_path / "p.jsonl"
    predictions.write_text('{"prediction": "they meet", "summary": "they meet at noon"}\n')
    env = {key: value for key, value in os.environ.items() if key != "DS_ACCELERATOR"}
    result = subprocess.run([sys.executable, "-c", WITHOUT_A_MODEL, str(tmp_path / "run"), str(predictions)],
                            capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "[0, 0, 2] False None"


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
    result = run_dsum("train", str(ROOT / "dsum" / "demo.yaml"), "train.max_steps=1",
                      f"output_dir={tmp_path / 'untrained'}")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "untrained" / "eval" / "metrics.json").read_text())
    assert metrics["rouge1"] < 0.2


# A tiny Llama generates batch after batch, longest prompts first, as an evaluation does; the page
# faults of a second such evaluation, after a first one has warmed everything up.
EVALUATION_FAULTS = """
import resource, sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
from dsum.cpu_speed import keep_freed_host_memory
kept = keep_freed_host_memory() if sys.argv[1] == "keep" else None
torch.manual_seed(0)
config = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=4)
model = LlamaForCausalLM(config).eval()
def evaluation():
    for length in range(240, 40, -20):
        ids = torch.randint(3, 1000, (32, length))
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=16,
                           min_new_tokens=16, do_sample=False, pad_token_id=0)
evaluation()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
evaluation()
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def evaluation_faults(mode: str, **env: str) -> tuple[str, int]:
    result = subprocess.run([sys.executable, "-c", EVALUATION_FAULTS, mode], capture_output=True, text=True,
                            timeout=300, cwd=ROOT, env={**os.environ, **env})
    assert result.returncode == 0, result.stderr
    kept, faults = result.stdout.split()
    return kept, int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_the_command_keeps_freed_tensor_memory_for_the_next_batches():
    """By default glibc hands the memory of a batch's freed tensors back, and the next batches fault it
    in again (9,500 to 45,000 pages here, as threads happen to share the work); kept, a tenth of that at
    most (tens to hundreds)."""
    _, faults = evaluation_faults("default")
    assert faults > 3_000
    kept, kept_faults = evaluation_faults("keep")
    assert kept == "True" and kept_faults < faults / 10


@pytest.mark.parametrize("variable, value", [("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=131072"),
                                             ("MALLOC_MMAP_THRESHOLD_", "65536")])
def test_a_users_own_malloc_settings_are_left_alone(monkeypatch, variable, value):
    from dsum import cpu_speed

    monkeypatch.undo()  # conftest's stand-in: this is the real one, which sets nothing here
    monkeypatch.setenv(variable, value)
    assert cpu_speed.keep_freed_host_memory() is False


# Stands in for the `kernels` package with the Hub offline, as kernels 0.19 behaves there: bitsandbytes, on a
# CPU with AVX512-BF16, asks it for a CPU kernel when it is imported; it warns, then fails.
KERNELS_OFFLINE = """import logging


def get_kernel(repo_id, version=None, **kwargs):
    logging.getLogger("kernels._internals.hf_hub").warning(
        f"Skipping publisher trust check for '{repo_id}' because Hugging Face Hub is in offline mode.")
    raise FileNotFoundError(f"Version {version} of '{repo_id}' is not available in the local cache and Hugging "
                            "Face Hub is in offline mode.")
"""


def offline_with_kernels(tmp_path: Path) -> dict[str, str]:
    """The environment of a user offline with the `kernels` package installed."""
    (tmp_path / "site" / "kernels").mkdir(parents=True)
    (tmp_path / "site" / "kernels" / "__init__.py").write_text(KERNELS_OFFLINE)
    path = os.pathsep.join(filter(None, [str(tmp_path / "site"), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": path}


def stderr_without_bars(stderr: str) -> list[str]:
    """What is left of stderr once the progress bars are taken out (a warning may follow a bar on its line)."""
    left = [re.sub(r"^(train|generate): [^\]]*\]", "", part).strip() for part in re.split(r"[\r\n]", stderr)]
    return [part for part in left if part]


def test_the_console_says_what_happened_and_nothing_else(tmp_path):
    """A QLoRA T5 with activation checkpointing, checkpoints and validation, offline, as a user runs it: an
    opening summary, a line per validation, the ROUGE table and where everything went. No library
    chatter: the kernel hub bitsandbytes and kernels cannot reach, transformers' deprecated names,
    Accelerate's note on the tied embeddings it drops from every checkpoint, and no word of a fast dropout
    the model (dropout 0) lacks."""
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "dsum", "train", str(ROOT / "recipes" / "tiny" / "t5-qlora.yaml"),
                             "train.max_steps=2", "train.save_steps=1", "train.eval_steps=1",
                             "train.gradient_checkpointing=true", "eval.validation_samples=2", "eval.max_new_tokens=4",
                             "data.synthetic.train_size=16", "data.synthetic.validation_size=4",
                             "data.synthetic.test_size=3", "tokenizer.vocab_size=300", f"output_dir={out}"],
                            capture_output=True, text=True, timeout=300, check=False, env=offline_with_kernels(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    assert stderr_without_bars(result.stderr) == []
    lines = result.stdout.splitlines()
    assert not any("dropout" in line for line in lines)
    opening = lines.index(f"training (qlora, fp32): 16 examples, 1 epoch, 2 optimizer steps (2 per epoch), global "
                          f"batch 8 (8 per device x 1 accumulation step x 1 process); writing to {out}")
    lines = lines[opening + 1:]
    assert re.fullmatch(r"step 1: validation loss \d+\.\d{4}, rouge1 \d\.\d{4}, rouge2 \d\.\d{4}, rougeL "
                        r"\d\.\d{4}, rougeLsum \d\.\d{4} \(on 2 dialogues\)", lines[0]), lines[0]
    assert lines[1].startswith("step 2: validation loss ")
    assert lines[2] == (f"evaluating {out / 'final'} on test: 3 dialogues, greedy, up to 4 new tokens, batches of 16 "
                        "per process x 1 process")
    assert lines[3].startswith("ROUGE F1 on test (n=3;")
    assert lines[-2] == f"evaluation written to {out / 'eval'}: metrics.json, predictions.jsonl"
    assert re.fullmatch(rf"finished in \d+\.\d s: the model in {out}/final, its log in {out}/metrics.jsonl, the run's "
                        rf"record in {out}/run.json, the evaluation in {out}/eval", lines[-1]), lines[-1]


# dsum score, a full fine-tuning run and its export, in one process: none needs bitsandbytes.
SCORE_TRAIN_EXPORT = """
import sys
from dsum.cli import main
export, train = sys.argv[2:4], sys.argv[4:]
statuses = [main(["score", "--predictions", sys.argv[1], "--json"]), main(["train", *train]), main(["export", *export])]
print(statuses, "bitsandbytes" in sys.modules)
"""


def test_score_full_fine_tuning_and_its_export_import_no_bitsandbytes_and_say_nothing_else(tmp_path):
    predictions = tmp_path / "p.jsonl"
    predictions.write_text('{"prediction": "they meet", "summary": "they meet at noon"}\n')
    result = subprocess.run([sys.executable, "-c", SCORE_TRAIN_EXPORT, str(predictions), str(tmp_path / "run"),
                             f"--out={tmp_path / 'export'}", str(ROOT / "recipes" / "tiny" / "t5-full.yaml"),
                             "train.max_steps=1",
                             "data.synthetic.train_size=8", "data.synthetic.validation_size=2",
                             "data.synthetic.test_size=2", "eval.max_new_tokens=2", "tokenizer.vocab_size=300",
                             f"output_dir={tmp_path / 'run'}"],
                            capture_output=True, text=True, timeout=300, cwd=ROOT, env=offline_with_kernels(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines()[-1] == "[0, 0, 0] False"
    assert (tmp_path / "export" / "model.safetensors").is_file()
    assert stderr_without_bars(result.stderr) == []


def test_version_is_the_installed_package_s():
    from importlib.metadata import version

    result = run_dsum("--version")
    assert result.returncode == 0
    assert result.stdout == f"dsum {version('dsum')}\n"
