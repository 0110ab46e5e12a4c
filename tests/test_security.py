"""Nothing runs that the user did not ask for: safe YAML, no remote code by default (and a loud warning
when asked), safetensors for weights, `torch.load` only for tensors, no secrets in what a run writes."""

from __future__ import annotations

import ast
import json
import logging
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, run_dsum, tiny
from dsum.config import load_recipe
from dsum.cli import train_and_evaluate
from dsum.train import train

PACKAGE = ROOT / "dsum"


def calls(name: str) -> list[tuple[Path, ast.Call]]:
    """Every call of `name` (a dotted name such as torch.load) in the package's source."""
    found = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == name:
                found.append((path, node))
    return found


def test_a_recipe_cannot_run_python_through_yaml_tags(tmp_path):
    recipe = tmp_path / "evil.yaml"
    marker = tmp_path / "ran"
    recipe.write_text(f'model: !!python/object/apply:os.system ["touch {marker}"]\noutput_dir: x\n')
    done = subprocess.run([sys.executable, "-m", "dsum", "validate", str(recipe)], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 2 and "could not determine a constructor for the tag" in done.stderr
    assert not marker.exists()


def test_the_package_reads_yaml_safely_and_loads_only_tensors_with_torch_load():
    import yaml

    from dsum.config import StrictLoader

    assert not calls("yaml.load") and not calls("yaml.unsafe_load") and not calls("yaml.full_load")
    assert issubclass(StrictLoader, yaml.SafeLoader)  # dsum's own loader (config.parse_yaml) is a safe one
    loads = calls("torch.load")
    assert loads, "the RNG state is read with torch.load"
    for path, call in loads:
        keywords = {k.arg: ast.unparse(k.value) for k in call.keywords}
        assert keywords.get("weights_only") == "True", f"{path}:{call.lineno} calls torch.load without weights_only=True"
    for banned in ("eval", "exec", "importlib.import_module", "__import__", "pickle.load", "pickle.loads"):
        assert not calls(banned), f"{banned} is called in the package"


def test_remote_code_is_off_by_default_and_loud_when_on(tmp_path, caplog):
    for path in sorted((ROOT / "recipes").rglob("*.yaml")):
        assert load_recipe(path).model.trust_remote_code is False, path
    with caplog.at_level(logging.WARNING):
        train(tiny("t5-lora", tmp_path / "run", "train.max_steps=1", "model.trust_remote_code=true"))
    assert "model.trust_remote_code is true: code shipped with" in caplog.text


def test_weights_are_safetensors_and_secrets_stay_out_of_what_a_run_writes(tmp_path, monkeypatch, capfd):
    secrets = {"HF_TOKEN": "hf_SECRETtoken123", "WANDB_API_KEY": "wandbSECRET456", "HUGGING_FACE_HUB_TOKEN": "hf_SECRET789"}
    for key, value in secrets.items():
        monkeypatch.setenv(key, value)
    run = tmp_path / "run"
    train_and_evaluate(tiny("t5-full", run, "train.max_steps=2", "train.save_steps=1", "eval.after_training=true",
               "train.trackers=[tensorboard]"))
    printed = "".join(capfd.readouterr())
    for path in run.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert not any(v.encode() in data for v in secrets.values()), f"a secret reached {path}"
    assert not any(v in printed for v in secrets.values())
    final = {p.name for p in (run / "final").iterdir()}
    assert "model.safetensors" in final and not any(n.endswith((".bin", ".pt", ".pth", ".pkl")) for n in final)
    checkpoint = next((run / "checkpoints").iterdir())
    assert (checkpoint / "model.safetensors").is_file()


OWN_CODE = """import os
import sys

print("THE MODEL'S OWN CODE RAN", file=sys.stderr, flush=True)
open(os.environ["DSUM_TEST_MARKER"], "w").close()

from transformers import T5Config


class MineConfig(T5Config):
    model_type = "mine"
"""


def test_a_models_own_code_never_runs_in_validate_and_runs_in_train_only_after_the_warning(tmp_path):
    """A local model whose config is its own code (auto_map): `dsum validate` never runs it, whatever the
    recipe says; `dsum train` with model.trust_remote_code warns before any of it runs."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "configuration_mine.py").write_text(OWN_CODE)
    (model / "config.json").write_text(json.dumps({
        "model_type": "mine", "auto_map": {"AutoConfig": "configuration_mine.MineConfig"}, "d_model": 32, "d_ff": 64,
        "d_kv": 8, "num_heads": 2, "num_layers": 1, "vocab_size": 300, "is_encoder_decoder": True}))
    marker = tmp_path / "ran"
    args = [str(ROOT / "recipes" / "tiny" / "t5-full.yaml"), "model.architecture=null", f"model.name_or_path={model}",
            "model.trust_remote_code=true", "tokenizer.train=true", "data.synthetic.train_size=16",
            f"output_dir={tmp_path / 'run'}"]
    env = {"DSUM_TEST_MARKER": str(marker), "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    validated = run_dsum("validate", *args, env=env)
    assert validated.returncode == 0, validated.stderr[-2000:]
    assert "dsum validate never runs a model's own code" in validated.stdout and not marker.exists()
    # A process of its own: what the person sees, in the order the command writes it.
    import os

    trained = subprocess.run([sys.executable, "-m", "dsum", "train", *args], capture_output=True, text=True,
                             timeout=300, check=False, env={**os.environ, **env})
    assert marker.exists()  # it ran, as the recipe allows (and then the model has no class to train)
    stderr = trained.stderr
    assert stderr.index("model.trust_remote_code is true: code shipped with") < stderr.index("THE MODEL'S OWN CODE RAN")
