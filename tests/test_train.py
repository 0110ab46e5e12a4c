"""The training loop in one process: each tiny recipe learns, accumulation and resume are exact,
adapters reload onto the saved base, and finished runs are not overwritten."""

from __future__ import annotations

import collections
import json
import os
import shutil
import traceback
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny
from dsum.config import RecipeError
from dsum.cli import train_and_evaluate
from dsum.train import train


def losses(output_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def weights(output_dir: Path) -> dict[str, torch.Tensor]:
    final = output_dir / "final"
    name = "adapter_model.safetensors" if (final / "adapter_model.safetensors").exists() else "model.safetensors"
    return load_file(final / name)


def assert_same_weights(a: Path, b: Path, atol: float) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], atol=atol, rtol=0, msg=key)


@pytest.mark.parametrize("name", ["t5-full", "t5-lora", "t5-qlora", "llama-full", "llama-lora", "llama-qlora"])
def test_each_tiny_recipe_learns(tmp_path, name):
    out = tmp_path / name
    final = train_and_evaluate(tiny(name, out, "train.max_steps=12", "train.logging_steps=3",
                                    "train.per_device_batch_size=4", "eval.after_training=true", "eval.max_new_tokens=8"))
    history = losses(out)
    assert len(history) == 4
    assert history[-1] < history[0] * 0.9, history
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "finished" and run["world_size"] == 1
    assert run["truncation"]["examples"] == 64
    assert "trainable parameters" in run["parameters"]
    assert (final / "tokenizer.json").is_file()
    assert (out / "eval" / "metrics.json").is_file()
    assert (final / ("adapter_model.safetensors" if "lora" in name else "model.safetensors")).is_file()


@pytest.mark.parametrize("family", ["t5", "llama"])
def test_accumulation_equals_one_large_batch(tmp_path, family):
    # One epoch of 60 examples: 7 windows of 4 x 2 and a short last one of 2 x 2 (a last batch of 4 for bs 8).
    common = ["data.synthetic.train_size=60", "train.num_epochs=1", "train.lr_scheduler=linear", "train.warmup_steps=1",
              "train.logging_steps=2"]
    train(tiny(f"{family}-full", tmp_path / "big", *common, "train.per_device_batch_size=8",
               "train.gradient_accumulation_steps=1"))
    train(tiny(f"{family}-full", tmp_path / "acc", *common, "train.per_device_batch_size=2",
               "train.gradient_accumulation_steps=4"))
    assert losses(tmp_path / "big") == pytest.approx(losses(tmp_path / "acc"), abs=1e-5)
    assert_same_weights(tmp_path / "big", tmp_path / "acc", atol=1e-5)


def test_resume_continues_at_the_exact_batch(tmp_path):
    # LoRA dropout on and a warm-up schedule, so that RNG, scheduler and optimizer state all matter.
    common = ["train.max_steps=6", "train.lr_scheduler=linear", "train.warmup_steps=2", "adapter.dropout=0.2",
              "train.per_device_batch_size=4", "train.gradient_accumulation_steps=2"]
    train(tiny("llama-lora", tmp_path / "straight", *common))
    train(tiny("llama-lora", tmp_path / "saved", *common, "train.save_steps=3"))
    # Start again from the step-3 checkpoint alone, as a killed job would.
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "saved", resumed)
    shutil.rmtree(resumed / "final")
    assert [p.name for p in (resumed / "checkpoints").iterdir()] == ["step-00000003"]
    train(tiny("llama-lora", resumed, *common, "train.save_steps=3"), resume="latest")
    assert losses(resumed) == pytest.approx(losses(tmp_path / "straight"), abs=1e-6)
    assert_same_weights(tmp_path / "straight", resumed, atol=1e-6)


def test_a_validation_between_steps_leaves_qlora_training_as_it_was(tmp_path):
    """On a CPU with AVX512-BF16, bitsandbytes repacks 4-bit weights for inference at the first forward in eval
    mode; the steps after a validation would train on them wrongly (dsum/modeling.py keep_4bit_layout)."""
    common = ["train.max_steps=3", "train.per_device_batch_size=2", "train.eval_max_batches=1"]
    train(tiny("t5-qlora", tmp_path / "plain", *common))
    train(tiny("t5-qlora", tmp_path / "validated", *common, "train.eval_steps=1"))
    assert losses(tmp_path / "validated") == pytest.approx(losses(tmp_path / "plain"), abs=1e-6)


@pytest.mark.parametrize("change", ["train.learning_rate=1e-2", "model.architecture.num_layers=3",
                                    "train.label_smoothing=0.1", "tokenizer.max_source_length=200"])
def test_a_resume_that_would_change_the_run_is_refused_naming_the_key(tmp_path, change):
    """The checkpoint keeps the recipe it trained with; a resume with another learning rate or architecture
    would train on with the checkpoint's state under a recipe it does not follow. Nothing is written."""
    out = tmp_path / "run"
    train(tiny("t5-full", out, "train.max_steps=4", "train.save_steps=2"))
    shutil.rmtree(out / "final")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    key, value = change.split("=")
    with pytest.raises(RecipeError, match=rf"--resume .*step-00000002: {key} is .* here, but the checkpoint trained "
                                          r"with .*; a resumed run keeps its recipe"):
        train(tiny("t5-full", out, "train.max_steps=4", "train.save_steps=2", change), resume="latest")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_training_lets_go_of_its_model_before_the_evaluation_loads_final(tmp_path, monkeypatch):
    """`dsum train` evaluates final/ after train() returns: the model, its optimizer and Accelerate's references
    to them must be gone by then, or the evaluation would hold a second model beside the first."""
    import gc
    import weakref

    import peft  # noqa: F401 - bitsandbytes, which peft imports, logs an exception whose traceback holds every
    # frame of the import, train()'s among them, for as long as a handler keeps the record (pytest's does)
    import dsum.train

    loaded, load = [], dsum.train.load_model
    def watched(*args, **kwargs):
        model = load(*args, **kwargs)
        loaded.append(weakref.ref(model))
        return model

    monkeypatch.setattr(dsum.train, "load_model", watched)
    train(tiny("t5-lora", tmp_path / "run", "train.max_steps=2", "train.save_steps=1"))
    gc.collect()
    assert len(loaded) == 1 and loaded[0]() is None


def test_a_resume_may_train_longer_and_log_and_evaluate_otherwise(tmp_path):
    out = tmp_path / "run"
    train(tiny("t5-full", out, "train.max_steps=4", "train.save_steps=2", "train.logging_steps=1"))
    shutil.rmtree(out / "final")
    train_and_evaluate(tiny("t5-full", out, "train.max_steps=6", "train.save_steps=3", "train.logging_steps=2",
               "eval.after_training=true", "eval.max_new_tokens=4", "train.trackers=[]"), resume="latest")
    assert [r["step"] for r in metric_rows(out)] == [1, 2, 4, 6]  # the first run's to its checkpoint, then every 2
    assert json.loads((out / "run.json").read_text())["total_steps"] == 6 and (out / "eval" / "metrics.json").is_file()


def test_qlora_adapter_reloads_onto_the_saved_base_and_generates_the_same(tmp_path):
    from peft import PeftModel
    from transformers import AutoTokenizer

    from dsum.data import load_split
    from dsum.generate import generate_predictions
    from dsum.modeling import load_model

    out = tmp_path / "q"
    recipe = tiny("t5-qlora", out, "train.max_steps=6", "eval.after_training=true", "eval.max_new_tokens=12")
    final = train_and_evaluate(recipe)
    config = json.loads((final / "adapter_config.json").read_text())
    assert Path(config["base_model_name_or_path"]) == (out / "base").resolve()
    base = load_model(recipe, config["base_model_name_or_path"], for_training=False)
    model = PeftModel.from_pretrained(base, final)
    tokenizer = AutoTokenizer.from_pretrained(final)
    examples = load_split(recipe.data, "test")
    again = [p.prediction for p in generate_predictions(recipe, model, tokenizer, examples, "cpu")]
    saved = [json.loads(line)["prediction"] for line in (out / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert again == saved
    assert any(saved)


def test_a_finished_run_is_not_overwritten_unless_asked(tmp_path):
    out = tmp_path / "run"
    train(tiny("t5-lora", out, "train.max_steps=1"))
    before = (out / "final" / "adapter_model.safetensors").read_bytes()
    with pytest.raises(RecipeError, match="already holds a finished run; pass --overwrite"):
        train(tiny("t5-lora", out, "train.max_steps=1"))
    assert (out / "final" / "adapter_model.safetensors").read_bytes() == before
    train(tiny("t5-lora", out, "train.max_steps=2"), overwrite=True)
    assert losses(out) and len(losses(out)) == 2


def test_a_directory_that_is_not_a_run_is_never_touched(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(RecipeError, match="holds no dsum run"):
        train(tiny("t5-lora", tmp_path, "train.max_steps=1"), overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_a_run_that_failed_before_its_first_step_is_replaced_unasked_and_one_after_it_is_not(tmp_path, monkeypatch,
                                                                                             capsys):
    """A model that does not load (offline, a typo) fails the run before it trains: running again replaces it,
    the user's files kept. A run that failed after a step holds a log worth keeping: --overwrite is asked for."""
    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr("dsum.train.load_model", lambda *a, **k: (_ for _ in ()).throw(
            RecipeError("model.name_or_path: cannot load 'org/model' (offline)")))
        with pytest.raises(RecipeError):
            train(tiny("t5-full", out, "train.max_steps=2"))
    assert json.loads((out / "run.json").read_text())["status"] == "failed"
    (out / "NOTES.md").write_text("mine")
    train(tiny("t5-full", out, "train.max_steps=2"))
    assert (f"output_dir {out}: replacing a failed run that ended before its first step (model.name_or_path: cannot "
            "load 'org/model' (offline))") in capsys.readouterr().out
    assert len(losses(out)) == 2 and (out / "NOTES.md").read_text() == "mine"

    def fail_after_step_1(name, step=None):
        if name == "train.step" and step == 1:
            raise RuntimeError("a fault after the first step")

    with monkeypatch.context() as patch:
        patch.setattr("dsum.train.faults.point", fail_after_step_1)
        with pytest.raises(RuntimeError):
            train(tiny("t5-full", out, "train.max_steps=2", "train.logging_steps=5"), overwrite=True)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(RecipeError, match="already holds a failed run; it saved no checkpoint to resume from; pass "
                                          "--overwrite to replace it"):
        train(tiny("t5-full", out, "train.max_steps=2"))
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("how", ["overwrite", "resume-auto"])
def test_a_new_run_replaces_what_a_run_wrote_and_nothing_else(tmp_path, how):
    """The user's own files beside a run (notes, code) stay when the run is replaced, with --overwrite or by
    --resume auto starting over a run that saved no checkpoint, as a requeued job does."""
    out = tmp_path / "run"
    train(tiny("t5-full", out, "train.max_steps=2"))
    (out / "NOTES.md").write_text("mine")
    (out / "src").mkdir()
    (out / "src" / "main.py").write_text("print('mine')")
    (out / "tensorboard").mkdir(exist_ok=True)
    if how == "resume-auto":
        shutil.rmtree(out / "final")
        run = json.loads((out / "run.json").read_text())
        (out / "run.json").write_text(json.dumps({**run, "status": "failed"}))
        train_and_evaluate(tiny("t5-full", out, "train.max_steps=3"), resume="auto")
    else:
        train(tiny("t5-full", out, "train.max_steps=3"), overwrite=True)
    assert (out / "NOTES.md").read_text() == "mine" and (out / "src" / "main.py").read_text() == "print('mine')"
    assert len(losses(out)) == 3  # the run's own entries were replaced: metrics.jsonl holds the new run alone
    assert json.loads((out / "run.json").read_text())["status"] == "finished"


@pytest.mark.parametrize("optimizer", ["adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "adafactor"])
def test_every_optimizer_trains(tmp_path, optimizer):
    out = tmp_path / optimizer
    train(tiny("t5-full", out, f"train.optimizer={optimizer}", "train.max_steps=6", "train.per_device_batch_size=4",
               "train.logging_steps=3"))
    history = losses(out)
    assert history[-1] < history[0], history


def test_bf16_checkpointing_validation_cadence_and_tensorboard(tmp_path):
    out = tmp_path / "run"
    train(tiny("llama-lora", out, "train.max_steps=6", "train.mixed_precision=bf16", "train.gradient_checkpointing=true",
               "train.eval_steps=2", "train.save_steps=2", "train.save_total_limit=1", "train.trackers=[tensorboard]",
               "train.per_device_batch_size=4", "eval.validation_samples=3", "eval.max_new_tokens=6"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "validation_loss" in r] == [2, 4, 6]
    assert all(0 <= r["validation_rouge1"] <= 1 for r in rows if "validation_loss" in r)
    assert all(set(r) >= {"step", "epoch", "loss", "learning_rate", "grad_norm", "tokens_per_second", "elapsed_seconds"}
               for r in rows if "loss" in r)
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000004"]  # older ones pruned, none at the end
    assert list((out / "tensorboard").rglob("events.out.tfevents*"))
    run = json.loads((out / "run.json").read_text())
    assert run["launch"]["mixed_precision"] == "bf16"


def test_trains_on_the_dialogsum_files(tmp_path):
    from conftest import DIALOGSUM as data
    out = tmp_path / "real"
    train(tiny("t5-full", out, f"data.source={data}", "data.max_train_samples=64", "train.max_steps=2",
               "tokenizer.max_source_length=128", "train.eval_max_batches=2"))
    run = json.loads((out / "run.json").read_text())
    assert run["num_train_examples"] == 64
    assert run["truncation"]["dialogues_truncated"] > 0  # real dialogues run past 128 tokens
    assert len(losses(out)) == 2


def test_accumulation_set_by_the_launcher_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "2")
    with pytest.raises(RecipeError, match="train.gradient_accumulation_steps is 1 but the Accelerate launch sets 2"):
        train(tiny("t5-full", tmp_path / "run", "train.max_steps=1"))
    assert not (tmp_path / "run").exists()


def test_grouping_by_length_raises_the_logged_padding_efficiency(tmp_path):
    def efficiency(run: Path) -> float:
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        values = [r["padding_efficiency"] for r in rows if "padding_efficiency" in r]
        assert values and all(0 < v <= 1 for v in values)
        return sum(values) / len(values)

    common = ["train.max_steps=16", "train.per_device_batch_size=8", "data.synthetic.train_size=256"]
    plain = train(tiny("llama-full", tmp_path / "plain", *common)).parent
    grouped = train(tiny("llama-full", tmp_path / "grouped", *common, "train.group_by_length=true")).parent
    assert efficiency(grouped) > efficiency(plain) + 0.05
    assert json.loads((grouped / "run.json").read_text())["status"] == "finished"


def test_telemetry_splits_the_step_time_and_sums_up_the_run(tmp_path):
    run = train(tiny("t5-full", tmp_path / "run", "train.max_steps=6", "train.logging_steps=3"),
                timed_from_step=3).parent
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert [r["step"] for r in rows] == [3, 6]
    for r in rows:
        phases = [r["data_seconds"], r["forward_backward_seconds"], r["optimizer_seconds"]]
        assert all(p > 0 for p in phases) and sum(phases) < r["elapsed_seconds"]
        assert r["forward_backward_seconds"] > r["data_seconds"]  # the model, not the collator, takes the time
        assert r["processed_tokens_per_second"] >= r["tokens_per_second"] > 0
        assert r["peak_host_rss_gib"] > 0.1
    summary = json.loads((run / "run.json").read_text())["telemetry"]
    shares = [summary[f"{p}_share"] for p in ("data", "forward_backward", "optimizer")]
    assert sum(shares) == pytest.approx(1.0) and all(0 < s < 1 for s in shares)
    assert summary["data_seconds"] == pytest.approx(sum(r["data_seconds"] for r in rows))
    assert rows[-1]["elapsed_seconds"] <= summary["loop_seconds"] < rows[-1]["elapsed_seconds"] + 1
    assert 0 < summary["padding_efficiency"] <= 1 and summary["tokens_per_second"] > 0
    # timed_from_step=3: the figures of steps 4 to 6 alone, which the log of step 6 also covers.
    after = summary["after_step"]
    assert (after["from_step"], after["steps"]) == (3, 3)
    assert after["padding_efficiency"] == rows[-1]["padding_efficiency"]  # the same tokens, counted alike
    assert after["real_tokens"] == round(after["real_tokens"]) > 0
    assert 0 < after["seconds"] < summary["loop_seconds"]  # it starts after step 3 and ends with the loop
    assert after["tokens_per_second"] == pytest.approx(after["real_tokens"] / after["seconds"])


def test_validation_and_checkpoint_time_is_kept_out_of_the_rates(tmp_path, monkeypatch):
    """A slow validation is in the loop's wall time, not in its tokens/s or MFU. The validation here
    moves the loop's clock on by 1,000 s instead of sleeping, so the test does not hang on the
    machine's speed: four tiny steps take seconds at most, and 1,000 s counted in would cut the rate
    a hundredfold or more."""
    import time
    from types import SimpleNamespace

    import dsum.train as loop

    validate, waited = loop.validate, [0.0]

    def slow_validate(*args, **kwargs):
        waited[0] += 1000.0
        return validate(*args, **kwargs)

    monkeypatch.setattr(loop, "validate", slow_validate)
    monkeypatch.setattr(loop, "time", SimpleNamespace(perf_counter=lambda: time.perf_counter() + waited[0]))
    run = train(tiny("t5-full", tmp_path / "run", "train.max_steps=4", "train.logging_steps=2", "train.eval_steps=2",
                     "train.save_steps=2")).parent
    before, after = metric_rows(run)  # steps 1-2, then 3-4 after the validation and the checkpoint at step 2
    assert after["elapsed_seconds"] - before["elapsed_seconds"] > 1000.0  # the wall clock saw the validation
    assert after["tokens_per_second"] > before["tokens_per_second"] / 100  # its rate did not
    summary = json.loads((run / "run.json").read_text())["telemetry"]
    assert summary["validation_and_checkpoint_seconds"] > 1000.0
    assert summary["training_seconds"] == pytest.approx(summary["loop_seconds"]
                                                         - summary["validation_and_checkpoint_seconds"])
    assert summary["training_seconds"] < 1000.0
    phases = sum(summary[f"{p}_seconds"] for p in ("data", "forward_backward", "optimizer"))
    assert phases <= summary["training_seconds"]


def metric_rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


def test_packed_training_equals_padded_training_without_padding(tmp_path):
    common = ["train.max_steps=4", "train.per_device_batch_size=4", "train.gradient_accumulation_steps=2"]
    padded = train(tiny("llama-full", tmp_path / "padded", *common)).parent
    packed = train(tiny("llama-full", tmp_path / "packed", *common, "train.packing=true")).parent
    assert losses(packed) == pytest.approx(losses(padded), rel=1e-5)  # the same to the 6th digit (see below)
    # Other matmul shapes round differently (1e-7), and Adam scales near-zero gradients up to the learning rate.
    assert_same_weights(padded, packed, atol=5e-4)
    assert all(r["padding_efficiency"] == 1.0 for r in metric_rows(packed))
    assert all(r["padding_efficiency"] < 0.95 for r in metric_rows(padded))


def test_packing_is_refused_for_a_model_without_position_ids(tmp_path):
    with pytest.raises(RecipeError, match="train.packing: BloomForCausalLM cannot keep packed examples apart"):
        train(tiny("llama-full", tmp_path / "run", "train.packing=true",
                   "model.architecture={model_type: bloom, hidden_size: 32, n_layer: 1, n_head: 2}"))


def test_token_budget_batches_train_resume_exactly_and_log_their_progress(tmp_path):
    common = ["train.max_tokens_per_batch=600", "train.group_by_length=true", "train.max_steps=6",
              "train.gradient_accumulation_steps=2", "data.synthetic.train_size=16"]
    straight = train(tiny("t5-full", tmp_path / "straight", *common)).parent
    rows = metric_rows(straight)
    run = json.loads((straight / "run.json").read_text())
    assert run["global_batch_size"] is None and run["steps_per_epoch"] < 6  # 16 examples: the 6 steps go past one epoch
    assert [r["epoch"] for r in rows] == sorted(r["epoch"] for r in rows) and rows[-1]["epoch"] > 1
    assert run["telemetry"]["padding_efficiency"] > 0.9  # batches of similar length
    saved = train(tiny("t5-full", tmp_path / "saved", *common, "train.save_steps=3")).parent
    shutil.rmtree(saved / "final")
    shutil.rmtree(saved / "checkpoints" / "step-00000006", ignore_errors=True)
    train(tiny("t5-full", saved, *common, "train.save_steps=3"), resume="latest")
    assert losses(saved) == pytest.approx(losses(straight), abs=1e-6)
    assert_same_weights(straight, saved, atol=1e-6)
    with pytest.raises(RecipeError, match="train.max_tokens_per_batch is 700 here, but the checkpoint trained with 600"):
        train(tiny("t5-full", saved, *[c.replace("=600", "=700") for c in common]), resume=str(
            saved / "checkpoints" / "step-00000003"))


def test_model_flops_are_counted_from_the_layers_and_give_mfu_against_a_peak(tmp_path, monkeypatch):
    from dsum import train as train_module
    from dsum.features import Collator
    from dsum.modeling import load_model, materialize_base, model_config
    from dsum.telemetry import FlopCounter

    monkeypatch.setattr(train_module, "device_peak_flops", lambda device: 1e12)  # a device of 1 TFLOP/s
    run = train(tiny("llama-lora", tmp_path / "run", "train.max_steps=4", "train.logging_steps=2")).parent
    rows = metric_rows(run)
    assert all(r["mfu"] == pytest.approx(r["model_tflops_per_second"]) and r["mfu"] > 0 for r in rows)
    assert json.loads((run / "run.json").read_text())["telemetry"]["mfu"] > 0

    # By hand, for one padded batch of the tiny Llama: 4N + 2N_trainable per token, plus attention, with
    # the output head at the target tokens only (3 of each example's tokens).
    recipe = tiny("llama-lora", run)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(run / "final")
    model = load_model(recipe, materialize_base(recipe, model_config(recipe, tokenizer), run))
    config = model.config
    linear = [(m.in_features * m.out_features, m.weight.requires_grad, name.endswith("lm_head"))
              for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    n_all, n_trainable = sum(n for n, _, head in linear if not head), sum(n for n, t, head in linear if t and not head)
    (n_head,) = [n for n, t, head in linear if head and not t]  # frozen, as the base
    assert 0 < n_trainable < n_all / 5  # the adapters alone train
    examples = [type("F", (), {"input_ids": [1] * n, "labels": [-100] * (n - 3) + [1] * 3})() for n in (5, 9)]
    width = config.num_attention_heads * config.head_dim
    expected = (14 * (4 * n_all + 2 * n_trainable) + 6 * 4 * n_head
                + 12 * width * config.num_hidden_layers * (5**2 + 9**2))
    assert FlopCounter(model).batch(Collator(tokenizer.pad_token_id).batch(examples)) == pytest.approx(expected)
    assert FlopCounter(model).batch(Collator(tokenizer.pad_token_id, packed=True).batch(examples)) == pytest.approx(expected)


def test_a_generation_setting_the_model_cannot_use_is_refused_before_training(tmp_path):
    arch = "model.architecture={model_type: longt5, d_model: 32, d_ff: 64, num_layers: 1, num_heads: 2, d_kv: 16}"
    with pytest.raises(RecipeError, match="eval.cache: static: LongT5ForConditionalGeneration does not support"):
        train(tiny("t5-full", tmp_path / "run", arch, "eval.cache=static", "eval.after_training=true"))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # not one step was taken


@pytest.mark.parametrize("exact", [False, True])
def test_a_causal_loss_runs_the_head_at_the_targets_alone_and_equals_the_full_loss(monkeypatch, exact):
    """At the collator's positions (a GPU's way), or exactly at the targets, by a mask (a CPU's way)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

    from dsum import cpu_speed
    from dsum.features import Collator
    from dsum.loss import TokenLoss
    from dsum.modeling import logits_for_targets_only

    monkeypatch.setattr(cpu_speed, "exact_targets", lambda device: exact)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=4, vocab_size=120))
    examples = [type("F", (), {"input_ids": torch.randint(3, 120, (n,)).tolist(), "labels": None})() for n in (7, 12, 4)]
    for f, prompt in zip(examples, (4, 5, 1)):
        f.labels = [-100] * prompt + f.input_ids[prompt:]
    heads_saw = []
    model.lm_head.register_forward_hook(lambda module, args, out: heads_saw.append(args[0].shape[:-1].numel()))
    for packed in (False, True):
        results = []
        for targets_only in (False, True):
            batch = Collator(0, packed=packed, targets_only=targets_only)(examples)
            model.zero_grad()
            loss = TokenLoss("causal", targets_only)(model, batch, label_smoothing=0.1)
            loss.backward()
            results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
        torch.testing.assert_close(results[0][0], results[1][0], atol=1e-5, rtol=1e-5)
        for full, kept in zip(results[0][1], results[1][1]):
            torch.testing.assert_close(full, kept, atol=1e-6, rtol=1e-4)
    # Every position (padded, then packed), or the targets alone: by a mask, exactly those; at the collator's
    # positions, padded, each row as many as the row with the most (7 of 3, 7 and 3), packed, exactly those.
    targets = (7 - 4) + (12 - 5) + (4 - 1)
    assert heads_saw == [3 * 12, targets if exact else 3 * 7, 23, targets]

    assert logits_for_targets_only(model)
    assert logits_for_targets_only(get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"])))
    assert not logits_for_targets_only(T5ForConditionalGeneration(T5Config(d_model=16, d_ff=32, num_layers=1,
                                                                           num_heads=2, d_kv=8, vocab_size=50)))

    class OwnHead(LlamaForCausalLM):  # code of its own, say from a model repository: the full logits
        def forward(self, input_ids=None, attention_mask=None, **kwargs):
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    assert not logits_for_targets_only(OwnHead(model.config))


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
                                        ("NVIDIA H200", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12),
                                        ("NVIDIA L40S", 362e12), ("NVIDIA L4", 121e12), ("NVIDIA L40", None),
                                        ("NVIDIA GeForce RTX 4090", None)])
def test_the_bf16_peak_is_known_by_the_device_name_s_whole_words(name, peak):
    from dsum.telemetry import peak_flops_of

    assert peak_flops_of(name) == peak


@pytest.mark.parametrize("name, theirs", [("linear", "linear"), ("cosine", "cosine"),
                                          ("constant", "constant_with_warmup")])
@pytest.mark.parametrize("warmup", [{"warmup_steps": 0}, {"warmup_steps": 3}, {"warmup_ratio": 0.25}])
def test_the_schedules_follow_transformers_own(name, theirs, warmup):
    """dsum writes its schedules out (transformers' import peft and bitsandbytes); the multipliers are
    transformers', step by step, past the end too."""
    import math

    from transformers import get_scheduler

    from dsum.config import TrainConfig
    from dsum.train import build_scheduler

    def rates(make) -> list[float]:
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        scheduler = make(optimizer)
        seen = []
        for _ in range(13):
            seen.append(scheduler.get_last_lr()[0])
            optimizer.step()
            scheduler.step()
        return seen

    cfg = TrainConfig(lr_scheduler=name, **warmup)
    steps = cfg.warmup_steps or math.ceil(cfg.warmup_ratio * 10)
    ours = rates(lambda optimizer: build_scheduler(cfg, optimizer, 10))
    assert ours == pytest.approx(rates(lambda optimizer: get_scheduler(theirs, optimizer, num_warmup_steps=steps,
                                                                       num_training_steps=10)), abs=1e-12)


class DeviceReads:
    """Counts, by optimizer step, the ops that read a tensor's value back to the host: on a GPU each waits
    for the device to finish everything queued before it. `aten._local_scalar_dense` is what `item()`,
    `float()`, `int()` and `bool()` of a tensor run; `aten.nonzero` is what boolean indexing runs. Reads
    made inside the model's own code (transformers, peft) are kept apart: dsum does not own them."""

    READS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::is_nonzero", "aten::equal")
    MODEL_CODE = (f"{os.sep}transformers{os.sep}", f"{os.sep}peft{os.sep}")

    def __init__(self, monkeypatch):
        from torch.utils._python_dispatch import TorchDispatchMode

        from dsum import faults

        self.step, self.reads, self.model_reads = 0, collections.Counter(), collections.Counter()
        point = faults.point

        def at_step(name, step=None):  # the loop calls this right after each optimizer step
            if name == "train.step":
                self.step = step
            return point(name, step)

        monkeypatch.setattr(faults, "point", at_step)
        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func._schema.name in DeviceReads.READS:
                    counter.record(func._schema.name)
                return func(*args, **(kwargs or {}))

        self.mode = Mode()

    def record(self, op: str) -> None:
        torch_dir = os.path.dirname(torch.__file__)
        caller = next(f for f in reversed(traceback.extract_stack()[:-2]) if not f.filename.startswith(torch_dir))
        where = f"{caller.filename}:{caller.lineno} {caller.name}: {op}"
        (self.model_reads if any(part in caller.filename for part in self.MODEL_CODE) else self.reads)[
            (self.step, where)] += 1

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)


@pytest.mark.parametrize("name, overrides", [("t5-full", ()), ("llama-lora", ()), ("llama-full", ("train.packing=true",))])
def test_nothing_is_read_from_the_device_between_logging_steps(tmp_path, monkeypatch, name, overrides):
    """Between two logging steps the loop reads no value of a tensor (the loss and the gradient norm stay
    on the device until logged; counts come from the host), so on a GPU the host never waits for the
    device and goes on to the next window while the device works. The reads after step k are those of
    step k's logging and of step k + 1: with a record every 4 steps, after steps 1-3 and 5-7 there are none.
    The GPU's path: the CPU's exact selection of a causal batch's targets, which counts a mask, is off."""
    from dsum import cpu_speed

    monkeypatch.setattr(cpu_speed, "exact_targets", lambda device: False)
    with DeviceReads(monkeypatch) as reads:
        train(tiny(name, tmp_path / "run", "train.max_steps=8", "train.logging_steps=4",
                   "train.gradient_accumulation_steps=2", "train.per_device_batch_size=4", *overrides))
    between = collections.Counter()
    for (step, where), n in reads.reads.items():
        between[where] += n if step % 4 else 0
    assert not +between, f"values read from the device inside optimizer steps: {between}"
    assert any(step == 4 for step, _ in reads.reads), "a logging step reads the loss: the counter must see it"
