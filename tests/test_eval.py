"""`dsum eval`: the same predictions and metrics with 1, 2 or 3 processes and under ZeRO-3, deduplicated
references, an interrupted evaluation that resumes without regenerating, and a static or compiled KV
cache that changes nothing but speed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, run_dsum, tiny
from dsum.scoring import ROUGE_KEYS
from dsum.train import train

RECIPE = ROOT / "recipes" / "tiny" / "t5-full.yaml"
# 7 test dialogues in batches of 2: 4 batches, which 2 or 3 processes cannot share evenly.
SETTINGS = ["data.synthetic.train_size=64", "data.synthetic.validation_size=8", "data.synthetic.test_size=7",
            "tokenizer.vocab_size=400", "eval.batch_size=2", "eval.max_new_tokens=12"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trained") / "run"
    train(tiny("t5-full", out, *SETTINGS, "train.max_steps=30", "train.per_device_batch_size=8"))
    return out


def dsum_eval(launcher: list[str], run_dir: Path, eval_dir: Path, *overrides: str, env=None) -> subprocess.CompletedProcess:
    """`dsum eval` of the trained run: under `launcher`'s processes, or in this one where there is none."""
    args = ["eval", str(RECIPE), *SETTINGS, *overrides, f"output_dir={run_dir}", "--checkpoint", str(run_dir / "final"),
            "--output-dir", str(eval_dir)]
    if launcher:
        result = subprocess.run([sys.executable, "-m", *launcher, "-m", "dsum", *args], capture_output=True, text=True,
                                timeout=600, env={**os.environ, **(env or {})})
    else:
        result = run_dsum(*args, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def test_same_predictions_with_1_2_and_3_processes(run_dir, tmp_path):
    from test_distributed import free_port

    outputs = {}
    for n in (1, 2, 3):
        launcher = [] if n == 1 else ["torch.distributed.run", "--nproc_per_node", str(n), "--master_port",
                                      str(free_port())]
        dsum_eval(launcher, run_dir, tmp_path / f"p{n}", env={"ACCELERATE_USE_CPU": "true"})
        outputs[n] = (tmp_path / f"p{n}" / "predictions.jsonl").read_bytes()
    rows = [json.loads(line) for line in outputs[1].decode().splitlines()]
    assert [r["id"] for r in rows] == [f"synthetic-test-{i:06d}" for i in range(7)]  # dataset order, none lost
    assert outputs[1] == outputs[2] == outputs[3]
    metrics = {n: json.loads((tmp_path / f"p{n}" / "metrics.json").read_text()) for n in (1, 2, 3)}
    assert metrics[3]["n"] == 7 and metrics[3]["world_size"] == 3
    assert not (tmp_path / "p3" / "partial").exists()
    # Each rank scored a share; gathered back in dataset order, the figures are those of one process, to the
    # last digit (the bootstrap intervals would differ if the per-dialogue scores came back in another order).
    figures = [*ROUGE_KEYS, "confidence_interval_95", "best_reference", "first_reference", "n", "references_per_dialogue"]
    assert [{k: metrics[n][k] for k in figures} for n in (2, 3)] == [{k: metrics[1][k] for k in figures}] * 2


def test_zero3_predictions_match_ddp(run_dir, tmp_path):
    from test_distributed import free_port

    # Batches of 3: 3 batches for 2 ranks, so under ZeRO-3 one rank must join a generate call it has no work for.
    dsum_eval(["torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())], run_dir,
              tmp_path / "ddp", "eval.batch_size=3", env={"ACCELERATE_USE_CPU": "true"})
    dsum_eval(["accelerate.commands.launch", "--config_file", str(ROOT / "accelerate_configs" / "zero3.yaml"),
               "--num_processes", "2", "--main_process_port", str(free_port())], run_dir, tmp_path / "z3",
              "eval.batch_size=3")
    assert (tmp_path / "z3" / "predictions.jsonl").read_bytes() == (tmp_path / "ddp" / "predictions.jsonl").read_bytes()


def test_flattened_references_are_merged_and_all_scored(run_dir, tmp_path):
    from dsum.config import DataConfig
    from dsum.data import load_split

    data = tmp_path / "data"
    data.mkdir()
    synthetic = DataConfig(source="synthetic", synthetic={"test_size": 7, "validation_size": 8, "train_size": 64})
    for split in ("train", "validation"):
        rows = [{"id": e.id, "dialogue": e.dialogue, "summary": e.references[0]} for e in load_split(synthetic, split)]
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    test = load_split(synthetic, "test")
    flat = [{"id": f"{e.id}_{k}", "dialogue": e.dialogue, "summary": f"{e.references[0]} ({k})"}
            for k in (1, 2, 3) for e in test]  # the Hub's layout: each dialogue once per reference, not adjacent
    (data / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in flat))
    dsum_eval([], run_dir, tmp_path / "flat", f"data.source={data}")
    rows = [json.loads(line) for line in (tmp_path / "flat" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 7
    assert all(len(r["references"]) == 3 for r in rows)
    assert rows[0]["id"] == test[0].id
    assert json.loads((tmp_path / "flat" / "metrics.json").read_text())["references_per_dialogue"] == 3


def interrupted(out: Path, run_dir: Path, model: Path, *overrides: str) -> dict[str, bytes]:
    """What a killed evaluation of `model` with these settings leaves: its mark, two finished predictions
    and a line cut short. Returns the files, to check later that they were left alone."""
    from dsum.config import load_recipe
    from dsum.evaluate import IDENTITY_FILE, evaluation_identity

    recipe = load_recipe(RECIPE, [*SETTINGS, *overrides, f"output_dir={run_dir}"])
    (out / "partial").mkdir(parents=True)
    (out / "partial" / IDENTITY_FILE).write_text(json.dumps(evaluation_identity(recipe, str(model.resolve()))))
    done = [{"id": f"synthetic-test-00000{i}", "prediction": f"kept {i}", "references": ["x"], "prompt_tokens": 1,
             "generated_tokens": 1} for i in (2, 5)]
    (out / "partial" / "rank-1.jsonl").write_text("".join(json.dumps(r) + "\n" for r in done) + '{"id": "synth')
    return {p.name: p.read_bytes() for p in (out / "partial").iterdir()}


def test_an_interrupted_evaluation_resumes_without_regenerating(run_dir, tmp_path):
    out = tmp_path / "resumed"
    # The batch sizes may change on resuming.
    interrupted(out, run_dir, run_dir / "final", "eval.batch_size=3", "eval.encoder_batch_size=2")
    result = dsum_eval([], run_dir, out)
    rows = {r["id"]: r for r in map(json.loads, (out / "predictions.jsonl").read_text().splitlines())}
    assert len(rows) == 7
    assert rows["synthetic-test-000002"]["prediction"] == "kept 2"  # taken as written, not generated again
    assert rows["synthetic-test-000005"]["prediction"] == "kept 5"
    assert all(not r["prediction"].startswith("kept") for k, r in rows.items() if k[-1] not in "25")
    assert "| rouge1    |" in result.stdout


@pytest.mark.parametrize("model, overrides, expected", [
    ("base", [], "of another model ("),  # a zero-shot evaluation interrupted, then the trained checkpoint
    ("final", ["eval.max_new_tokens=5"], "made with other settings (eval.max_new_tokens)"),
])
def test_an_interrupted_evaluation_of_another_model_or_settings_is_never_mixed_in(run_dir, tmp_path, model,
                                                                                  overrides, expected):
    out = tmp_path / "other"
    left = interrupted(out, run_dir, run_dir / model, *overrides)
    command = ["eval", str(RECIPE), *SETTINGS, f"output_dir={run_dir}", "--checkpoint", str(run_dir / "final"),
               "--output-dir", str(out)]
    refused = run_dsum(*command)
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert refused.stderr.strip().splitlines()[-1] == (
        f"dsum: error: {out / 'partial'} holds the predictions of an unfinished evaluation {expected}"
        + (f"{(run_dir / 'base').resolve()})" if model == "base" else "")
        + "; pass --overwrite to start afresh, or --output-dir to write elsewhere")
    assert {p.name: p.read_bytes() for p in (out / "partial").iterdir()} == left  # nothing lost
    assert not (out / "predictions.jsonl").exists()
    started_afresh = run_dsum(*command, "--overwrite")
    assert started_afresh.returncode == 0, started_afresh.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 7 and not any(r["prediction"].startswith("kept") for r in rows)
    assert json.loads((out / "metrics.json").read_text())["model"] == str((run_dir / "final").resolve())


def test_a_finished_evaluation_is_not_overwritten_unless_asked(run_dir, tmp_path):
    out = tmp_path / "twice"
    dsum_eval([], run_dir, out)
    before = (out / "metrics.json").read_bytes()
    command = ["eval", str(RECIPE), *SETTINGS, f"output_dir={run_dir}", "--checkpoint", str(run_dir / "final"),
               "--output-dir", str(out)]
    refused = run_dsum(*command)
    assert refused.returncode == 2 and "already holds a finished evaluation" in refused.stderr
    assert (out / "metrics.json").read_bytes() == before
    assert run_dsum(*command, "--overwrite").returncode == 0


def test_a_prompted_baseline_evaluates_the_base_alone_with_shots(run_dir, tmp_path):
    out = tmp_path / "fewshot"
    result = run_dsum("eval", str(RECIPE), *SETTINGS, f"output_dir={run_dir}", "prompt.shots=2",
                      "tokenizer.max_source_length=400", "--output-dir", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["shots"] == 2 and metrics["n"] == 7
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    # Two solved examples precede each dialogue: every prompt is longer than the dialogue's zero-shot prompt.
    from transformers import AutoTokenizer

    from dsum.data import load_split
    from dsum.features import Featurizer

    recipe = tiny("t5-full", run_dir, *SETTINGS, "tokenizer.max_source_length=400")
    zero_shot = Featurizer(recipe, AutoTokenizer.from_pretrained(run_dir / "tokenizer"))
    for row, example in zip(rows, load_split(recipe.data, "test")):
        assert row["prompt_tokens"] > len(zero_shot.prompt_ids(example.dialogue)) + 40


def test_the_comparison_report_renders_with_its_tables_and_plots(run_dir, tmp_path):
    import csv

    from dsum.report import compare

    # Two evaluations of the same split: the trained run (with its loss curve) and a prompted baseline.
    dsum_eval([], run_dir, run_dir / "eval")
    baseline = tmp_path / "zero-shot"
    zero_shot = run_dsum("eval", str(RECIPE), *SETTINGS, f"output_dir={run_dir}", "--output-dir", str(baseline))
    assert zero_shot.returncode == 0, zero_shot.stderr[-3000:]
    out = compare([baseline, run_dir], tmp_path / "report", samples=3).out
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2  # ROUGE bars and the loss curve, embedded
    assert "Change over the first run" in page and "Sample summaries" in page
    rouge_rows = list(csv.DictReader((out / "rouge.csv").open()))
    assert [r["run"] for r in rouge_rows] == ["zero-shot", "run"]
    trained = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert float(rouge_rows[1]["rouge1"]) == pytest.approx(trained["rouge1"])
    change = list(csv.DictReader((out / "changes.csv").open()))[0]
    base = json.loads((baseline / "metrics.json").read_text())
    assert float(change["rouge1_change"]) == pytest.approx(trained["rouge1"] - base["rouge1"], abs=1e-9)
    assert 0 <= float(change["rouge1_p"]) <= 1
    samples = list(csv.DictReader((out / "samples.csv").open()))
    assert len(samples) == 3 and set(samples[0]) == {"id", "reference", "zero-shot", "run"}
    assert (out / "report.md").read_text().startswith("# dsum comparison")
    assert (out / "loss.png").stat().st_size > 1000


def test_merging_the_adapter_before_generation_changes_nothing_but_the_model(tmp_path):
    from peft import PeftModel

    from dsum.trained import load_for_eval
    from dsum.evaluate import run_eval

    recipe = tiny("t5-lora", tmp_path / "run", "train.max_steps=8", "eval.max_new_tokens=12")
    final = train(recipe)
    merged_recipe = recipe.model_copy(update={"eval": recipe.eval.model_copy(update={"merge_adapter": True})})
    merged, _ = load_for_eval(merged_recipe, final)
    assert not isinstance(merged, PeftModel) and not any("lora_" in k for k in merged.state_dict())
    plain = run_eval(recipe, checkpoint=final, output_dir=tmp_path / "plain", overwrite=False)
    folded = run_eval(merged_recipe, checkpoint=final, output_dir=tmp_path / "merged", overwrite=False)
    assert (tmp_path / "plain" / "predictions.jsonl").read_text() == (tmp_path / "merged" / "predictions.jsonl").read_text()
    assert plain["rouge1"] == folded["rouge1"]


def test_out_of_memory_halves_the_batch_and_keeps_the_predictions(tmp_path, capsys):
    import torch

    from dsum.config import RunError
    from dsum.data import load_split
    from dsum.trained import load_for_eval
    from dsum.generate import generate_predictions

    for name in ("t5-full", "llama-full"):  # right- and left-padded prompts
        recipe = tiny(name, tmp_path / name, "train.max_steps=4", "eval.batch_size=8", "eval.max_new_tokens=10",
                      "data.synthetic.test_size=20")
        final = train(recipe)
        model, tokenizer = load_for_eval(recipe, final)
        examples = load_split(recipe.data, "test")
        expected = generate_predictions(recipe, model, tokenizer, examples, "cpu")

        real_generate, sizes = model.generate, []
        def small_memory(**kwargs):
            sizes.append(len(kwargs["input_ids"]))
            if len(kwargs["input_ids"]) > 2:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            return real_generate(**kwargs)

        model.generate = small_memory
        assert generate_predictions(recipe, model, tokenizer, examples, "cpu") == expected
        assert sizes[:3] == [8, 4, 2] and set(sizes[3:]) == {2}  # halved twice, then kept at 2
        assert "generating 2 dialogue(s) at a time from here on" in capsys.readouterr().out

        model.generate = lambda **kwargs: (_ for _ in ()).throw(torch.OutOfMemoryError("simulated"))
        with pytest.raises(RunError, match="out of memory generating 1 dialogue"):
            generate_predictions(recipe, model, tokenizer, examples, "cpu")


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory) -> dict[str, Path]:
    """`final/` of the tiny T5 and Llama, briefly trained. T5 starts from wider weights: with the default
    ones its greedy outputs are the same for every dialogue, which would make comparisons weak."""
    finals = {}
    for name in ("t5-full", "llama-full"):
        recipe = tiny(name, tmp_path_factory.mktemp(name) / "run", "train.max_steps=4")
        if name == "t5-full":
            wide = {**recipe.model.architecture, "initializer_factor": 5.0}
            recipe = recipe.model_copy(update={"model": recipe.model.model_copy(update={"architecture": wide})})
        finals[name] = train(recipe)
    return finals


def predict(final: Path, name: str, *overrides: str, watch=None):
    """Predictions for the test split in batches of 4 (prompts of mixed lengths; Llama's left-padded).
    `watch` is called with the model before it generates."""
    from dsum.data import load_split
    from dsum.trained import load_for_eval
    from dsum.generate import generate_predictions

    recipe = tiny(name, final.parent, "eval.batch_size=4", "eval.max_new_tokens=10", *overrides)
    model, tokenizer = load_for_eval(recipe, final)
    if watch is not None:
        watch(model)
    return generate_predictions(recipe, model, tokenizer, load_split(recipe.data, "test"), "cpu")


@pytest.mark.parametrize("name", ["t5-full", "llama-full"])
def test_a_static_cache_gives_the_predictions_of_a_dynamic_one(tiny_pair, name):
    from dsum.generate import plan_batches

    dynamic = predict(tiny_pair[name], name, "data.synthetic.test_size=10")
    assert predict(tiny_pair[name], name, "data.synthetic.test_size=10", "eval.cache=static") == dynamic
    # What makes the comparison worth making: outputs that differ by dialogue, and padding in every batch.
    assert len({p.prediction for p in dynamic}) >= 8
    lengths = [p.prompt_tokens for p in dynamic]
    assert all(len({lengths[i] for i in batch}) > 1 for batch in plan_batches(lengths, 4))


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_the_encoder_in_parts_gives_the_predictions_of_one_pass(tiny_pair, cache):
    """eval.encoder_batch_size=3 with batches of 4: the encoder takes 3 prompts and then 1, each part as
    wide as its own longest prompt, and the decoder the 4 together."""
    from dsum.generate import plan_batches

    settings = ["data.synthetic.test_size=10", f"eval.cache={cache}"]
    whole = predict(tiny_pair["t5-full"], "t5-full", *settings)
    shapes = []
    watch = lambda model: model.get_encoder().register_forward_pre_hook(
        lambda module, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True)
    assert predict(tiny_pair["t5-full"], "t5-full", *settings, "eval.encoder_batch_size=3", watch=watch) == whole
    lengths = [p.prompt_tokens for p in whole]
    parts = [batch[start : start + 3] for batch in plan_batches(lengths, 4) for start in range(0, len(batch), 3)]
    assert shapes == [(len(part), max(lengths[i] for i in part)) for part in parts]
    batch_widths = [max(lengths[i] for i in batch) for batch in plan_batches(lengths, 4) for _ in range(0, len(batch), 3)]
    assert [width for _, width in shapes] != batch_widths  # some parts cut narrower than their batch


@pytest.mark.parametrize("name", ["t5-full", "llama-full"])
def test_the_growing_cache_gives_the_predictions_of_transformers_own(tiny_pair, monkeypatch, name):
    """dsum's KV cache for eval.cache: dynamic, against the one `generate` makes by itself. With room for
    one more token at a time it regrows at every step, and beam search reorders it at every step. (Its
    usual path, greedy with room to spare, is also compared with a static cache above.)"""
    from dsum import cpu_speed

    settings = ["data.synthetic.test_size=10", "eval.num_beams=2"]
    made, real = [], cpu_speed.growing_cache
    monkeypatch.setattr(cpu_speed.GrowingLayer, "ROOM", 1)
    monkeypatch.setattr(cpu_speed, "growing_cache", lambda model, device: made.append(real(model, device)) or made[-1])
    growing = predict(tiny_pair[name], name, *settings)
    caches = [getattr(cache, "self_attention_cache", cache) for cache in made]
    assert len(caches) == 3 and all(layer._filled > 1 for cache in caches for layer in cache.layers)
    monkeypatch.setattr(cpu_speed, "growing_cache", lambda model, device: None)
    assert predict(tiny_pair[name], name, *settings) == growing


def test_compiled_decoding_gives_the_predictions_of_a_dynamic_cache(tiny_pair, monkeypatch):
    import torch

    compiled, real_compile = [], torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: compiled.append(kwargs) or real_compile(fn, **kwargs))
    settings = ["data.synthetic.test_size=8"]  # two batches of 4: one shape, compiled once (about 20 s on a CPU)
    dynamic = predict(tiny_pair["llama-full"], "llama-full", *settings)
    assert not compiled
    assert predict(tiny_pair["llama-full"], "llama-full", *settings, "eval.cache=static", "eval.compile=true") == dynamic
    assert len(compiled) == 1  # on a CPU, where transformers would not compile unasked
    torch._dynamo.reset()


def test_a_static_cache_is_compiled_only_when_asked_even_on_cuda(tiny_pair, monkeypatch):
    import torch
    from transformers import StaticCache

    from dsum.trained import load_for_eval
    from dsum.generate import generation_kwargs

    name, final = "llama-full", tiny_pair["llama-full"]
    model, tokenizer = load_for_eval(tiny(name, final.parent), final)
    monkeypatch.setattr(type(model), "device", property(lambda self: torch.device("cuda")))

    def compiles(*overrides: str) -> bool:
        kwargs = generation_kwargs(tiny(name, final.parent, *overrides), tokenizer)
        config, _ = model._prepare_generation_config(None, **kwargs)
        return model._valid_auto_compile_criteria({"past_key_values": StaticCache(model.config, max_cache_len=8)},
                                                  config)

    assert not compiles("eval.cache=static")  # transformers alone would compile it on CUDA
    assert compiles("eval.cache=static", "eval.compile=true")


def test_what_generate_cannot_do_is_refused_before_generating(tmp_path):
    from types import SimpleNamespace

    from transformers import LlamaConfig, LlamaForCausalLM, LongT5Config, LongT5ForConditionalGeneration

    from dsum.config import RecipeError
    from dsum.generate import generate_predictions

    def refusal(name: str, model, *overrides: str, synced_gpus: bool = False) -> str:
        with pytest.raises(RecipeError) as err:
            generate_predictions(tiny(name, tmp_path, *overrides), model, None, [], "cpu", synced_gpus=synced_gpus)
        return str(err.value)

    longt5 = LongT5ForConditionalGeneration(LongT5Config(d_model=16, d_ff=32, d_kv=4, num_heads=2, num_layers=1,
                                                         vocab_size=64))
    assert refusal("t5-full", longt5, "eval.cache=static") == (
        "eval.cache: static: LongT5ForConditionalGeneration does not support a static KV cache; use eval.cache: dynamic")
    llama = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, vocab_size=64))
    compiled = ["eval.cache=static", "eval.compile=true"]
    assert refusal("llama-full", llama, *compiled, synced_gpus=True).startswith("eval.compile: not under ZeRO-3")
    llama.hf_quantizer = SimpleNamespace(is_compileable=False)
    assert refusal("llama-full", llama, *compiled).startswith("eval.compile: transformers does not compile")


@pytest.mark.parametrize("name", ["t5-lora", "t5-full"])
def test_a_final_checkpoint_is_evaluated_from_anywhere_with_what_it_brings(tmp_path, name, monkeypatch):
    """`dsum eval RECIPE --checkpoint RUN/final` with the recipe's own output_dir (where nothing was trained):
    the adapter finds its random-init base through adapter_config.json, the tokenizer is final/'s, and the
    evaluation lands in RUN/eval beside it."""
    run = tmp_path / "elsewhere" / "run"
    train(tiny(name, run, "train.max_steps=2"))
    monkeypatch.chdir(tmp_path)  # the recipe's output_dir (runs/tiny-...) resolves here, and holds nothing
    result = run_dsum("eval", str(ROOT / "recipes" / "tiny" / f"{name}.yaml"), "data.synthetic.test_size=3",
                      "eval.max_new_tokens=4", "--checkpoint", str(run / "final"))
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert metrics["n"] == 3 and metrics["model"] == str((run / "final").resolve())
    assert not (tmp_path / "runs").exists()
