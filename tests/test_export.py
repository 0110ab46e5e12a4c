"""Any checkpoint, as it is: `dsum export` writes full models, merged LoRA and QLoRA adapters and bare adapters
that transformers and peft load without dsum and that compute what was trained, from final/, from a checkpoint
saved mid-run and from ZeRO-3's and FSDP's shards; `dsum eval --checkpoint` evaluates each of them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, run_dsum, tiny
from dsum.train import train

NAMES = ("t5-full", "t5-lora", "t5-qlora", "llama-full", "llama-lora", "llama-qlora")
STEP_1 = Path("checkpoints") / "step-00000001"
IDS = [[5, 6, 7, 8, 9, 10, 11, 12, 1]]

# Loads each export with transformers and peft alone, dsum made unimportable, and saves its logits.
LOAD_WITHOUT_DSUM = """
import sys
sys.modules["dsum"] = None
import torch
from peft import AutoPeftModelForSeq2SeqLM
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

loaders = {"seq2seq": AutoModelForSeq2SeqLM, "causal": AutoModelForCausalLM, "adapter": AutoPeftModelForSeq2SeqLM}
ids = torch.tensor(IDS)
logits = {}
for spec in sys.argv[2:]:
    label, kind, path = spec.split(":", 2)
    model = loaders[kind].from_pretrained(path).eval()
    decoder = {"decoder_input_ids": ids} if kind != "causal" else {}
    with torch.no_grad():
        logits[label] = model(input_ids=ids, **decoder).logits
torch.save(logits, sys.argv[1])
""".replace("IDS", repr(IDS))


def two_steps(root: Path, name: str, *overrides: str) -> Path:
    """A run of 2 optimizer steps that saved a checkpoint after the first."""
    out = root / name
    train(tiny(name, out, "train.max_steps=2", "train.save_steps=1", *overrides))
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    return {name: two_steps(root, name) for name in NAMES}


@pytest.fixture(scope="module")
def one_step(tmp_path_factory) -> dict[str, Path]:
    """Runs of 1 step: the model each 2-step run saved after its first (constant learning rate, same batches)."""
    root = tmp_path_factory.mktemp("one-step")
    finals = {}
    for name in ("t5-full", "llama-qlora"):
        train(tiny(name, root / name, "train.max_steps=1"))
        finals[name] = root / name
    return finals


def family(name: str) -> str:
    return "seq2seq" if name.startswith("t5") else "causal"


def logits(model, name: str) -> torch.Tensor:
    ids = torch.tensor(IDS)
    with torch.no_grad():
        return model(input_ids=ids, **({"decoder_input_ids": ids} if family(name) == "seq2seq" else {})).logits


def as_trained(run: Path, name: str, base: str = "as trained") -> torch.Tensor:
    """Logits of final/ built with transformers and peft alone: the full model, or the adapter on its base,
    4-bit for QLoRA; with `base` "dequantised", its NF4 values in float32, and "full precision", the
    original base."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, BitsAndBytesConfig

    auto = AutoModelForSeq2SeqLM if family(name) == "seq2seq" else AutoModelForCausalLM
    if name.endswith("full"):
        return logits(auto.from_pretrained(run / "final"), name)
    quantized = name.endswith("qlora") and base != "full precision"
    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                             bnb_4bit_use_double_quant=True) if quantized else None
    model = auto.from_pretrained(run / "base", quantization_config=nf4)
    if base == "dequantised":
        model = model.dequantize()
    return logits(PeftModel.from_pretrained(model, run / "final").eval(), name)


def load_without_dsum(tmp_path: Path, exports: dict[str, tuple[str, Path]]) -> dict[str, torch.Tensor]:
    """{label: logits} of each export (its loader kind and directory), in a process where dsum is not importable."""
    out = tmp_path / "logits.pt"
    specs = [f"{label}:{kind}:{path}" for label, (kind, path) in exports.items()]
    result = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_DSUM, str(out), *specs], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": ""})
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out, weights_only=True)


def export(source: Path, out: Path, *options: str) -> list[str]:
    result = run_dsum("export", str(source), "--out", str(out), *options)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.splitlines()


def test_every_kind_of_model_exports_as_transformers_loads_it_and_computes_what_was_trained(runs, one_step, tmp_path,
                                                                                           monkeypatch):
    exports = {}
    for name in NAMES:
        merge = [] if name.endswith("full") else ["--merge"]
        lines = export(runs[name], tmp_path / name, *merge)
        exports[name] = (family(name), tmp_path / name)
        assert lines[0].startswith(f"exporting {runs[name]}, the ")
        assert lines[1].startswith("finished in ") and lines[1].endswith(
            f"the export in {tmp_path / name}, which AutoModelFor{'Seq2Seq' if name.startswith('t5') else 'Causal'}"
            "LM.from_pretrained loads without dsum")
    assert {p.name for p in (tmp_path / "t5-lora").iterdir()} == {
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}
    assert json.loads((tmp_path / "t5-lora" / "generation_config.json").read_text())["max_new_tokens"] == 40
    # Saved mid-run: the model after step 1 of 2, which a 1-step run saved as its final/.
    for name in one_step:
        export(runs[name] / STEP_1, tmp_path / f"{name}-step-1", *([] if name.endswith("full") else ["--merge"]))
        exports[f"{name}-step-1"] = (family(name), tmp_path / f"{name}-step-1")
    # An adapter alone: what peft's AutoPeftModel loads, onto the base it names; final/'s own files, copied
    # without loading any model.
    with monkeypatch.context() as patched:
        patched.setattr("dsum.export.load_trained", lambda *a, **k: pytest.fail("a model loaded to copy an adapter"))
        lines = export(runs["t5-lora"], tmp_path / "t5-lora-adapter")
    saved = [(d / "adapter_model.safetensors").read_bytes()
             for d in (runs["t5-lora"] / "final", tmp_path / "t5-lora-adapter")]
    assert saved[0] == saved[1]
    assert lines[0].endswith(f"as a PEFT adapter on {(runs['t5-lora'] / 'base').resolve()}, to {tmp_path / 't5-lora-adapter'}")
    exports["t5-lora-adapter"] = ("adapter", tmp_path / "t5-lora-adapter")

    loaded = load_without_dsum(tmp_path, exports)
    close = lambda a, b, atol: torch.testing.assert_close(a, b, atol=atol, rtol=0)  # noqa: E731
    for name in NAMES:
        if name.endswith("qlora"):
            # The merged weights are the NF4 values the adapter trained against, not the original base:
            # the adapter on the dequantised base to float precision, on the 4-bit one to the CPU kernel's
            # bf16 arithmetic, and far from the adapter on the full-precision base.
            close(loaded[name], as_trained(runs[name], name, "dequantised"), 1e-5)
            close(loaded[name], as_trained(runs[name], name), 0.1)
            assert (loaded[name] - as_trained(runs[name], name, "full precision")).abs().max() > 0.3
        else:
            close(loaded[name], as_trained(runs[name], name), 1e-5)
    close(loaded["t5-full-step-1"], as_trained(one_step["t5-full"], "t5-full"), 1e-5)
    close(loaded["llama-qlora-step-1"], as_trained(one_step["llama-qlora"], "llama-qlora", "dequantised"), 1e-5)
    close(loaded["t5-lora-adapter"], as_trained(runs["t5-lora"], "t5-lora"), 1e-5)
    assert (loaded["t5-full-step-1"] - loaded["t5-full"]).abs().max() > 1e-3  # step 1 is not step 2


def predictions(eval_dir: Path) -> list[str]:
    return [json.loads(line)["prediction"] for line in (eval_dir / "predictions.jsonl").read_text().splitlines()]


def test_a_checkpoint_saved_mid_run_is_evaluated_from_anywhere_as_the_model_it_was(runs, one_step, tmp_path,
                                                                                   monkeypatch):
    """`dsum eval --checkpoint RUN/checkpoints/step-N` from another directory, with a recipe that gives the
    evaluation settings alone: the QLoRA adapter on its 4-bit base, the run's tokenizer, and the evaluation in
    RUN/eval/step-N; its predictions are those of the same model saved as final/."""
    monkeypatch.chdir(tmp_path)
    recipe = str(ROOT / "recipes" / "tiny" / "llama-qlora.yaml")
    for checkpoint in (runs["llama-qlora"] / STEP_1, one_step["llama-qlora"] / "final"):
        result = run_dsum("eval", recipe, "data.synthetic.test_size=5", "eval.max_new_tokens=8", "--checkpoint",
                          str(checkpoint))
        assert result.returncode == 0, result.stderr[-3000:]
    evaluated = runs["llama-qlora"] / "eval" / STEP_1.name
    metrics = json.loads((evaluated / "metrics.json").read_text())
    assert metrics["n"] == 5 and metrics["model"] == str((runs["llama-qlora"] / STEP_1).resolve())
    assert predictions(evaluated) == predictions(one_step["llama-qlora"] / "eval")
    assert not (tmp_path / "runs").exists()  # the recipe's own output_dir was never written


# Runs sharded across two ranks, as users launch them: the Accelerate config, the tiny recipe, the environment,
# and how the export's opening line names step 1's checkpoint.
SHARDED = {
    "zero3": ("zero3", "t5-lora", {}, "the LoRA adapter saved at step 1 (DeepSpeed ZeRO shards), merged into its base"),
    "fsdp": ("fsdp", "t5-full", {"ACCELERATE_USE_CPU": "true"}, "the full model saved at step 1 (FSDP shards), in "),
}


@pytest.fixture(scope="module", params=list(SHARDED))
def sharded(request, tmp_path_factory) -> tuple[str, Path]:
    """A run trained by two ranks of 2 examples each for 2 steps, checkpointed after the first, in its
    launcher's own layout of shards: (the recipe's name, the run)."""
    from test_distributed import free_port

    config, name, env, _ = SHARDED[request.param]
    out = tmp_path_factory.mktemp(request.param) / "run"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "accelerate_configs" / f"{config}.yaml"), "--num_processes", "2", "--main_process_port",
               str(free_port()), "-m", "dsum", "train", str(ROOT / "recipes" / "tiny" / f"{name}.yaml"),
               "data.synthetic.train_size=64", "data.synthetic.validation_size=8", "data.synthetic.test_size=5",
               "eval.after_training=false", "tokenizer.vocab_size=400", "train.max_steps=2", "train.save_steps=1",
               "train.per_device_batch_size=2", f"output_dir={out}"]
    result = subprocess.run(command, cwd=out.parent, capture_output=True, text=True, timeout=600,
                            env={**os.environ, **env})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    shards = "latest" if config == "zero3" else "pytorch_model_fsdp_0"  # each launcher's own layout, a file per rank
    assert (out / STEP_1 / shards).exists()
    return request.param, out


@pytest.mark.slow
def test_a_sharded_checkpoint_exports_and_evaluates_as_one_process_trained_it(sharded, tmp_path):
    """Step 1's shards (ZeRO-3's, FSDP's), gathered in one process, are the model one process makes in one step
    of the same global batch: exported (an adapter merged), and evaluated."""
    from dsum.cli import train_and_evaluate

    launch, run = sharded
    _, name, _, opening = SHARDED[launch]
    single = tmp_path / "single"
    train_and_evaluate(tiny(name, single, "train.max_steps=1", "train.per_device_batch_size=4",
                            "eval.after_training=true", "eval.max_new_tokens=8"))
    lines = export(run / STEP_1, tmp_path / "export", *([] if name.endswith("full") else ["--merge"]))
    assert opening in lines[0]
    loaded = load_without_dsum(tmp_path, {launch: (family(name), tmp_path / "export")})
    torch.testing.assert_close(loaded[launch], as_trained(single, name), atol=1e-4, rtol=0)
    result = run_dsum("eval", str(ROOT / "recipes" / "tiny" / f"{name}.yaml"), "data.synthetic.test_size=5",
                      "eval.max_new_tokens=8", f"output_dir={tmp_path / 'unused'}", "--checkpoint", str(run / STEP_1))
    assert result.returncode == 0, result.stderr[-3000:]
    assert predictions(run / "eval" / STEP_1.name) == predictions(single / "eval")
