"""`dsum bench`: one tiny run on the real DialogSum files checks that the three ways are compared on
the same data and counted alike, and that the reported ratios are the ratios of the reported rates;
the GPU configurations are checked on the meta device. No speed goal is asserted here."""

from __future__ import annotations

import json
import math
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import DIALOGSUM, ROOT, reset_accelerate_state
from dsum.bench import dsum_way, harness, inputs, notebook, options, peers, recipes, sizes
from dsum.cli import main
from dsum.config import recipe_to_dict
from dsum.features import Collator, Feature
from dsum.profiling import Schedule


# Tiny: 200 training dialogues, batches of 2, 4 timed steps in 2 training rounds (each after 1 warm-up
# step), 4 test dialogues. dsum's own way with two settings of `--dsum`: they must reach its training
# and its generation, and nothing of the other ways. `--profile`: each way's first round is profiled
# over its 2 timed steps (optimizer steps 2 and 3).
TRAIN_STEPS, TRAIN_ROUNDS, EVAL_DIALOGUES, NOTEBOOK_ROWS, BATCH = 4, 2, 4, 2, 2
DSUM_OPTIONS = ("train.fast_cpu_dropout=false", "eval.batch_size=3")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The bench on both CPU models with tiny sizes, through the command line, profiled; (results, stdout,
    profile directory).

    On one thread: where other work shares the 2 cores, two OpenMP threads stall on each other and
    the run takes minutes instead of well under one."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("bench")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    patch = pytest.MonkeyPatch()
    tiny = replace(sizes.CPU_SIZES, train_examples=200, warmup_steps=1, train_rounds=TRAIN_ROUNDS)
    patch.setitem(sizes.SIZES, "cpu", tiny)
    models = tuple(replace(spec, recipe={**spec.recipe, "train": {**spec.recipe["train"], "per_device_batch_size": BATCH}})
                   for spec in sizes.CPU_MODELS)
    patch.setitem(sizes.MODELS, "cpu", models)
    stdout = io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout):
            status = main(["bench", "--data", str(DIALOGSUM), "--json", str(out / "bench.json"), "--models", "t5,llama",
                           "--train-steps", str(TRAIN_STEPS), "--eval-dialogues", str(EVAL_DIALOGUES),
                           "--notebook-rows", str(NOTEBOOK_ROWS), "--workdir", str(out / "work"),
                           "--profile", str(out / "profiles"), *(f"--dsum={option}" for option in DSUM_OPTIONS)])
    finally:
        patch.undo()
        torch.set_num_threads(threads)
        reset_accelerate_state()
    assert status == 0, stdout.getvalue()[-2000:]
    return json.loads((out / "bench.json").read_text()), stdout.getvalue(), out / "profiles"



def test_every_figure_is_there_and_finite(run):
    results, stdout, _ = run
    for key in sizes.GOALS:
        assert math.isfinite(results[key]) and results[key] > 0, key
    assert set(results["models"]) == {"t5", "llama"}
    for model in results["models"].values():
        for way in sizes.WAYS:
            for value in (model["train"][way]["real_tokens_per_second"], model["train"][way]["padding_efficiency"],
                          model["eval"][way]["dialogues_per_second"]):
                assert math.isfinite(value) and value > 0
    machine = results["machine"]
    assert machine["cpu"] and machine["cpu_cores"] >= 1 and machine["torch"] == torch.__version__
    assert results["command"].startswith("dsum bench --device cpu --data ")
    assert results["command"].endswith(" --dsum train.fast_cpu_dropout=false --dsum eval.batch_size=3")
    assert results["dsum_options"] == list(DSUM_OPTIONS)
    assert "dsum's way ran with train.fast_cpu_dropout=false eval.batch_size=3 (--dsum), not its defaults" in stdout
    assert results["date"] and results["wall_seconds"] > 0
    assert "t5 (seq2seq" in stdout and "llama (causal" in stdout and "total wall time" in stdout


def test_the_ratios_are_the_ratios_of_the_rates(run):
    results, _, _ = run
    for model in results["models"].values():
        train = {way: model["train"][way]["real_tokens_per_second"] for way in sizes.WAYS}
        speed = {way: model["eval"][way]["dialogues_per_second"] for way in sizes.WAYS}
        ratios = model["ratios"]
        assert ratios["train_speedup_vs_notebook"] == pytest.approx(train["dsum"] / train["notebook"])
        assert ratios["train_speedup_vs_no_trainer"] == pytest.approx(train["dsum"] / train["no_trainer"])
        assert ratios["eval_speedup_vs_notebook"] == pytest.approx(speed["dsum"] / speed["notebook"])
        assert ratios["eval_speedup_vs_no_trainer"] == pytest.approx(speed["dsum"] / speed["no_trainer"])
        for way in sizes.WAYS:
            record = model["train"][way]
            assert record["real_tokens_per_second"] == pytest.approx(record["real_tokens"] / record["seconds"])
    for key in sizes.GOALS:  # the top-level figure is the conservative one: the minimum over models
        assert results[key] == pytest.approx(min(m["ratios"][key] for m in results["models"].values()))


def test_the_ways_train_on_the_same_data_for_the_same_steps(run):
    results, _, _ = run
    for name, model in results["models"].items():
        train = model["train"]
        assert {train[way]["dataset_examples"] for way in sizes.WAYS} == {200}, name
        # The notebook's padded rows and the no_trainer features hold the same real tokens.
        assert train["notebook"]["dataset_real_tokens"] == train["no_trainer"]["dataset_real_tokens"]
        assert {train[way]["steps"] for way in sizes.WAYS} == {TRAIN_STEPS}
        assert train["notebook"]["rows"] == train["no_trainer"]["rows"] == TRAIN_STEPS * BATCH
        assert model["batch_size"] == BATCH


def test_padding_is_what_each_way_does(run):
    results, _, _ = run
    cpu = sizes.CPU_SIZES
    for name, model in results["models"].items():
        notebook, no_trainer, dsum = (model["train"][way] for way in sizes.WAYS)
        # max_length padding: every row is 512 wide, and a T5 row's labels too; a causal row 512 + 128.
        width = 2 * cpu.max_source_length if model["family"] == "seq2seq" else (
            cpu.max_source_length + cpu.max_target_length)
        assert notebook["processed_tokens"] == notebook["rows"] * width, name
        assert notebook["padding_efficiency"] < 0.5, name
        assert notebook["padding_efficiency"] < no_trainer["padding_efficiency"] < 1.0, name
        assert dsum["padding_efficiency"] >= 0.9, name
        assert model["ratios"]["padding_efficiency"] == dsum["padding_efficiency"]


def test_the_ways_generate_the_same_for_the_same_dialogues(run):
    results, stdout, _ = run
    for name, model in results["models"].items():
        evaluation = model["eval"]
        assert {evaluation[way]["dialogues"] for way in sizes.WAYS} == {EVAL_DIALOGUES}
        # The flattened split: one row per reference, 3 per DialogSum test dialogue; dsum generates each once.
        assert evaluation["notebook"]["rows"] == evaluation["no_trainer"]["rows"] == 3 * EVAL_DIALOGUES
        assert evaluation["dsum"]["rows"] == EVAL_DIALOGUES
        assert evaluation["no_trainer"]["rows_timed"] == 3 * EVAL_DIALOGUES and evaluation["notebook"]["batch_size"] == 1
        notebook = evaluation["notebook"]
        assert notebook["extrapolated"] and notebook["rows_timed"] == NOTEBOOK_ROWS
        assert notebook["seconds"] == pytest.approx(notebook["seconds_timed"] * notebook["rows"] / NOTEBOOK_ROWS)
        lengths = [evaluation[way]["mean_new_tokens"] for way in sizes.WAYS]
        assert max(lengths) - min(lengths) <= 1.0, (name, lengths)  # the same work per row in every way
        assert max(lengths) <= sizes.CPU_SIZES.max_new_tokens
    assert "extrapolated" in stdout
    # dsum's generation settings: its batch (from --dsum), and for T5 the encoder's part of it.
    assert results["models"]["t5"]["dsum_eval_settings"] == {"batch_size": 3, "encoder_batch_size": 16,
                                                             "cache": "dynamic", "compile": False}
    assert results["models"]["llama"]["dsum_eval_settings"] == {"batch_size": 3, "encoder_batch_size": None,
                                                                "cache": "dynamic", "compile": False}
    for model in results["models"].values():
        assert model["eval"]["dsum"]["batch_size"] == 3  # what dsum's generator was given
        assert model["train"]["dsum"]["settings"]["fast_cpu_dropout"] is False
        assert model["dsum_settings"]["fast_cpu_dropout"] is False and model["dsum_settings"]["group_by_length"]


def test_the_evaluation_is_timed_in_rounds_that_take_the_ways_in_turn(run):
    """The notebook's timed rows and no_trainer's batches are split between the rounds, dsum's pass is
    repeated in each; the printed phases alternate the ways round by round."""
    results, stdout, _ = run
    rounds = 2  # Sizes.eval_rounds (3), capped by the 2 notebook rows and no_trainer's 2 batches of 8 rows
    for name, model in results["models"].items():
        evaluation = model["eval"]
        assert {evaluation[way]["rounds"] for way in sizes.WAYS} == {rounds}
        assert evaluation["dsum"]["rows_timed"] == rounds * EVAL_DIALOGUES
        assert evaluation["dsum"]["seconds"] == pytest.approx(evaluation["dsum"]["seconds_timed"] / rounds)
        phases = [f"bench: {name}: eval {way}, round {part} of {rounds} " for part in (1, 2) for way in sizes.WAYS]
        where = [stdout.index(line) for line in phases]
        assert where == sorted(where), stdout


def test_the_training_is_timed_in_rounds_that_take_the_ways_in_turn(run):
    """The timed steps are split between the rounds, each way trains once a round, and the printed
    phases alternate the ways round by round."""
    results, stdout, _ = run
    for name, model in results["models"].items():
        train = model["train"]
        assert {train[way]["rounds"] for way in sizes.WAYS} == {TRAIN_ROUNDS}
        assert {train[way]["steps"] for way in sizes.WAYS} == {TRAIN_STEPS}  # 2 + 2, summed
        phases = [f"bench: {name}: train {way}, round {part} of {TRAIN_ROUNDS} " for part in (1, 2)
                  for way in sizes.WAYS]
        where = [stdout.index(line) for line in phases]
        assert where == sorted(where), stdout
        assert f"bench: {name}: train dsum, {TRAIN_ROUNDS} rounds: " in stdout


def test_each_way_is_profiled_over_timed_steps_of_its_first_round(run):
    """One profile per way and model (the first round's), over the steps after the warm-up; top operators
    by self CPU time that are aten ops; no device figures on the CPU; summary.json holds every run."""
    results, stdout, profiles = run
    runs = {f"{model}-{way}" for model in ("t5", "llama") for way in sizes.WAYS}
    assert {p.name for p in profiles.iterdir()} == {f"{name}.{ext}" for name in runs for ext in ("txt", "json")} | {
        "summary.json"}
    summary = json.loads((profiles / "summary.json").read_text())["runs"]
    assert set(summary) == runs
    schedule = Schedule.after(1, 1 + TRAIN_STEPS // TRAIN_ROUNDS)
    for name in runs:
        record = json.loads((profiles / f"{name}.json").read_text())
        assert record == summary[name]
        assert record["schedule"]["active"] == schedule.active == record["profiled_steps"] == 2, name
        assert record["optimizer_steps"] == [2, 3], name  # after the warm-up step, inside the round's 3 steps
        ops = [row["name"] for row in record["top_by_self_cpu"]]
        assert len(ops) == 25 and sum(op.startswith("aten::") for op in ops[:10]) >= 5, (name, ops)
        assert {"aten::mm", "aten::addmm", "aten::bmm", "aten::linear"} & set(ops[:10]), (name, ops)
        assert record["device_busy_share"] is None and record["top_by_self_device"] is None
        text = (profiles / f"{name}.txt").read_text()
        assert "top 25 operators by self CPU time:" in text and ops[0][:60] in text
        assert "not available: a CPU run has no device time" in text
        assert f"profile {name}: 2 steps of " in stdout
    assert results["profile_dir"] == str(profiles.resolve())
    for model in ("t5", "llama"):
        assert set(results["models"][model]["profile"]) == set(sizes.WAYS)
        for way in sizes.WAYS:
            kept = results["models"][model]["profile"][way]
            assert kept["profiled_steps"] == 2 and kept["top"] == [
                {"name": row["name"], "self_cpu_us": row["self_cpu_us"]}
                for row in summary[f"{model}-{way}"]["top_by_self_cpu"][:5]]
    assert f"profiles: {profiles.resolve()} (summary.json holds every run)" in stdout


def test_the_results_name_the_commit_of_the_checkout(run):
    import subprocess

    results, stdout, _ = run
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    if head.returncode == 0:  # a clone, as CI runs it
        assert results["commit"] == head.stdout.strip() and isinstance(results["dirty"], bool)
        assert f"dsum commit: {results['commit'][:12]}" in stdout
    else:  # an unpacked archive: said, never an error
        assert results["commit"] is None and results["dirty"] is None
        assert "dsum commit: unknown (not a git checkout)" in stdout
    assert " --profile " in results["command"]


def test_training_rounds_split_the_steps_and_take_their_own_seeds():
    steps = replace(sizes.CPU_SIZES, train_steps=16, train_rounds=3, seed=7)
    parts = sizes.train_rounds(steps)
    assert [(p.train_steps, p.seed, p.warmup_steps) for p in parts] == [(6, 7, 2), (5, 8, 2), (5, 9, 2)]
    assert [p.train_steps for p in sizes.train_rounds(replace(steps, train_steps=2))] == [1, 1]  # no empty round
    assert [p.train_steps for p in sizes.train_rounds(replace(steps, train_rounds=1))] == [16]


def test_rounds_combine_into_one_speed():
    part = harness.EvalSpeed(dialogues=10, rows=30, rows_timed=4, batch_size=1, seconds_timed=2.0, mean_new_tokens=30.0,
                           cpu_share=0.9, other_cpu_share=0.0)
    other = replace(part, rows_timed=2, seconds_timed=6.0, mean_new_tokens=33.0, cpu_share=0.5, other_cpu_share=0.4)
    both = harness.EvalSpeed.combined([part, other])
    assert (both.rows_timed, both.seconds_timed, both.rounds) == (6, 8.0, 2)
    assert both.mean_new_tokens == pytest.approx(31.0)  # per row
    assert both.cpu_share == pytest.approx(0.6) and both.other_cpu_share == pytest.approx(0.3)  # per second
    assert both.dialogues_per_second == pytest.approx(10 / (8.0 * 30 / 6))
    assert harness.EvalSpeed.combined([replace(part, cpu_share=None), other]).cpu_share is None

    step = harness.TrainSpeed(steps=3, seconds=1.0, real_tokens=900, processed_tokens=1000, dataset_examples=50,
                            dataset_real_tokens=9000, rows=24, cpu_share=0.9, other_cpu_share=0.0)
    later = replace(step, steps=2, seconds=3.0, real_tokens=300, processed_tokens=600, rows=16, cpu_share=0.5,
                    other_cpu_share=0.4)
    trained = harness.TrainSpeed.combined([step, later])
    assert (trained.steps, trained.seconds, trained.real_tokens, trained.processed_tokens, trained.rows,
            trained.rounds) == (5, 4.0, 1200, 1600, 40, 2)
    assert trained.real_tokens_per_second == pytest.approx(300.0) and trained.padding_efficiency == pytest.approx(0.75)
    assert trained.cpu_share == pytest.approx(0.6) and trained.other_cpu_share == pytest.approx(0.3)
    assert trained.dataset_examples == 50 and harness.TrainSpeed.combined([step, replace(later, rows=None)]).rows is None


def test_other_work_on_the_machine_is_what_marks_a_phase_busy(tmp_path):
    """A way that ran while another process kept a core busy is marked; a way whose own process used
    little of its threads (dsum's single-threaded setup) is not, when the system tells what the others
    used. The readings are given, as a 2-core machine reports them, so the verdict depends on the code alone."""
    # A 10 s phase whose process used 2 of its 20 thread-seconds; all processes together 2.3 s, or 12 s
    # with another process on a core the whole time.
    quiet_own, quiet_others = harness.cpu_shares(own=2.0, wall=10.0, machine=2.3, threads=2, cores=2)
    crowded_own, crowded_others = harness.cpu_shares(own=2.0, wall=10.0, machine=12.0, threads=2, cores=2)
    assert quiet_own == crowded_own == pytest.approx(0.1) and quiet_own < harness.BUSY  # the own share cannot tell them apart
    assert quiet_others == pytest.approx(0.015) and crowded_others == pytest.approx(0.5)
    assert harness.cpu_shares(own=2.0, wall=10.0, machine=1.9, threads=2, cores=2)[1] == 0.0  # ticks are coarse
    speed = harness.TrainSpeed(steps=1, seconds=10.0, real_tokens=1, processed_tokens=1, dataset_examples=1)
    assert "(the machine was busy)" in replace(speed, cpu_share=crowded_own, other_cpu_share=crowded_others).describe()
    assert "(the machine was busy)" not in replace(speed, cpu_share=quiet_own, other_cpu_share=quiet_others).describe()
    assert "(the machine was busy)" in replace(speed, cpu_share=quiet_own, other_cpu_share=None).describe()  # own share
    # /proc/stat's first line: user nice system idle iowait irq softirq steal; idle and iowait are not work.
    stat = tmp_path / "stat"
    stat.write_text("cpu  300 0 100 5000 200 0 0 100 0 0\ncpu0 150 0 50 2500 100 0 0 50 0 0\n")
    assert harness.machine_cpu_seconds(stat) == pytest.approx(500 / os.sysconf("SC_CLK_TCK"))
    assert harness.machine_cpu_seconds(tmp_path / "missing") is None


def test_token_counts_use_dsum_definitions():
    """The notebook and no_trainer batches are counted as dsum counts its own (MicroBatch)."""
    features = [Feature([5, 6, 7, 1], [8, 9, 1]), Feature([5, 1], [8, 9, 10, 11, 1])]
    seq2seq = Collator(pad_token_id=0, decoder_start_token_id=0).batch(features)
    assert peers.token_counts(seq2seq.tensors, "seq2seq") == (seq2seq.real_tokens, seq2seq.processed_tokens) == (14, 18)
    causal = Collator(pad_token_id=0).batch([Feature([3, 5, 6, 8, 1], [-100, -100, -100, 8, 1]), Feature([3, 5], [-100, 5])])
    assert peers.token_counts(causal.tensors, "causal") == (causal.real_tokens, causal.processed_tokens) == (7, 10)
    assert peers.feature_real_tokens(features, "seq2seq") == seq2seq.real_tokens
    rows = notebook.notebook_dataset(features, "seq2seq", 0, sizes.CPU_SIZES)
    assert sum(peers.token_counts(notebook.stack([r]), "seq2seq")[0] for r in rows) == seq2seq.real_tokens


def test_dsum_is_timed_by_its_own_telemetry_over_the_bench_s_steps():
    """Warm-up 2, timed 4: the figures of run.json's after_step, which must cover exactly those steps."""
    window = replace(sizes.CPU_SIZES, warmup_steps=2, train_steps=4)
    timed = {"from_step": 2, "steps": 4, "seconds": 3.0, "real_tokens": 500.0, "processed_tokens": 530.0}
    assert dsum_way.timed_window({"telemetry": {"after_step": timed}}, window) == timed
    # A run timed over other steps, or not at all, has no window to give, and says why.
    with pytest.raises(RuntimeError, match="timed 3 steps after step 3, not the bench's 4 steps after 2"):
        dsum_way.timed_window({"telemetry": {"after_step": {**timed, "from_step": 3, "steps": 3}}}, window)
    with pytest.raises(RuntimeError, match="timed none"):
        dsum_way.timed_window({"telemetry": {}}, window)


def test_gpu_architectures_have_the_real_parameter_counts():
    """flan-t5-base ~248M, flan-t5-large ~783M, Llama-2-7B ~6.74B, built on the meta device."""
    from transformers import AutoConfig

    for spec in sizes.CUDA_MODELS:
        arch = dict(spec.architecture)
        config = AutoConfig.for_model(arch.pop("model_type"), **arch)
        assert inputs.parameter_count(inputs.build_model(spec, config, meta=True)) == spec.parameters, spec.name
    assert [round(spec.parameters / 1e6) for spec in sizes.CUDA_MODELS] == [248, 783, 6738, 6738]


def test_gpu_recipes_take_their_settings_from_recipes(tmp_path):
    """Everything before the GPU: each spec's recipes/ file combines with the bench's settings and
    dsum's speed switches into a valid recipe."""
    for spec in sizes.CUDA_MODELS:
        family = recipes.recipe_settings(spec)["model"]["family"]
        speed = {k: 1024 if v == sizes.TOKEN_BUDGET else v for k, v in sizes.DSUM_SPEED[family].items()}
        recipe = recipes.bench_recipe(spec, sizes.CUDA_SIZES, model_source={"name_or_path": str(tmp_path / "base")},
                                    tokenizer_dir=tmp_path / "tokenizer", data_dir=tmp_path, output_dir=tmp_path / "run",
                                    dsum={"train": speed})
        assert recipe.train.mixed_precision == "bf16" and recipe.train.optimizer == "adamw"
        assert recipe.train.max_steps == sizes.CUDA_SIZES.warmup_steps + sizes.CUDA_SIZES.train_steps
        assert recipe.adapter.method == {"flan-t5-base": "none", "flan-t5-large": "none", "llama-2-7b-lora": "lora",
                                         "llama-2-7b-qlora": "qlora"}[spec.name]
        assert recipe.tokenizer.max_source_length == 512 and recipe.tokenizer.max_target_length == 128


def test_gpu_recipes_are_read_from_the_recipes_directory_before_anything_runs(tmp_path, monkeypatch):
    """The checkout's recipes/ by default, --recipes DIR otherwise; a directory without the file, no such
    directory, or an installed dsum with no recipes/ beside it: one line each. The CPU models need none."""
    from dsum.config import RecipeError

    [base] = options.select_models("cuda", ["flan-t5-base"])
    assert base.recipe_file == "flan-t5-base/full.yaml" and base.recipe_source == "flan-t5-base/full.yaml"
    assert base.recipe == recipes.recipe_settings(sizes.CUDA_MODELS[0])  # the file's settings, read once
    (tmp_path / "flan-t5-base").mkdir()
    (tmp_path / "flan-t5-base" / "full.yaml").write_text("model: {family: seq2seq}\ntrain: {learning_rate: 0.5}\n")
    [mine] = options.select_models("cuda", ["flan-t5-base"], tmp_path)
    assert mine.recipe == {"model": {"family": "seq2seq"}, "train": {"learning_rate": 0.5}}
    with pytest.raises(RecipeError, match=r"^--recipes .*: no flan-t5-large/full.yaml in it, where dsum bench takes "):
        options.select_models("cuda", ["flan-t5-large"], tmp_path)
    with pytest.raises(RecipeError, match=r"^--recipes .*missing: no such directory$"):
        options.select_models("cuda", None, tmp_path / "missing")
    monkeypatch.setattr(recipes, "CHECKOUT_RECIPES", tmp_path / "site-packages" / "recipes")
    with pytest.raises(RecipeError, match=r"^--recipes: the GPU models take their settings from the recipes/ of a dsum "
                                          r"checkout, .* give --recipes DIR$"):
        options.select_models("cuda", ["llama-2-7b-lora"])
    assert [spec.recipe_source for spec in options.select_models("cpu", None)] == [
        "inline (dsum/bench/sizes.py cpu_recipe)"] * 2
    assert options.BenchOptions(recipes=tmp_path).command() == f"dsum bench --device cpu --recipes {tmp_path}"


def test_the_command_imports_the_bench_only_when_it_runs():
    """`dsum --help` and every other command build the bench's options from its sizes alone."""
    import subprocess
    import sys

    code = ("import sys; from dsum.cli import build_parser; build_parser(); "
            "print(sorted(m for m in sys.modules if m.startswith(('dsum.bench', 'torch'))))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.stdout.strip() == "['dsum.bench', 'dsum.bench.options', 'dsum.bench.sizes']"


def test_dsum_options_change_dsums_own_way_alone(tmp_path):
    """`--dsum KEY=VALUE` reaches dsum's recipe, typed as the schema types it, and nothing else of the
    recipe every way reads; the command that reruns the bench names it."""
    chosen = options.BenchOptions(dsum=("train.fast_cpu_dropout=false", "eval.cache=static", "eval.batch_size=8",
                                        "train.max_tokens_per_batch=null"))
    settings = chosen.dsum_settings()
    assert settings == {"train": {"fast_cpu_dropout": False, "max_tokens_per_batch": None},
                        "eval": {"cache": "static", "batch_size": 8}}
    assert chosen.command().endswith("--dsum train.fast_cpu_dropout=false --dsum eval.cache=static "
                                     "--dsum eval.batch_size=8 --dsum train.max_tokens_per_batch=null")
    assert recipes.check_dsum_settings(settings, sizes.CPU_MODELS + sizes.CUDA_MODELS, sizes.CPU_SIZES) == settings
    paths = {"model_source": {"name_or_path": str(tmp_path / "base")}, "tokenizer_dir": tmp_path / "tokenizer",
             "data_dir": tmp_path, "output_dir": tmp_path / "run"}
    for spec in sizes.CPU_MODELS:
        shared = recipes.bench_recipe(spec, sizes.CPU_SIZES, **paths)
        own = recipes.bench_recipe(spec, sizes.CPU_SIZES, **paths, dsum=settings)
        assert recipes.dsum_own_settings(shared, "train")["fast_cpu_dropout"] is True
        assert recipes.dsum_own_settings(own, "train")["fast_cpu_dropout"] is False
        assert recipes.dsum_own_settings(own, "eval") == {"batch_size": 8, "cache": "static", "compile": False,
                                                         "encoder_batch_size": shared.eval.encoder_batch_size}
        changed = {("train", "fast_cpu_dropout"), ("eval", "cache"), ("eval", "batch_size")}
        a, b = recipe_to_dict(shared), recipe_to_dict(own)
        assert {(section, key) for section in a if isinstance(a[section], dict) for key in a[section]
                if a[section][key] != b[section][key]} == changed
    assert options.BenchOptions().dsum_settings() == {"train": {}, "eval": {}}


def test_cuda_without_a_gpu_is_a_one_line_error(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["bench", "--device", "cuda", "--data", str(DIALOGSUM)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dsum: error: --device cuda:"), err


def test_unknown_model_is_a_one_line_error(capsys, tmp_path):
    assert main(["bench", "--models", "t5,gpt2", "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["dsum: error: --models: gpt2 not benched on cpu; choose from t5, llama"]


def test_help_lists_the_quick_run_options(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    text = capsys.readouterr().out
    for option in ("--device", "--data", "--json", "--models", "--train-steps", "--eval-dialogues", "--notebook-rows",
                   "--profile", "--record"):
        assert option in text


def test_options_below_one_are_refused(tmp_path):
    with pytest.raises(Exception, match="--train-steps: must be at least 1"):
        options.BenchOptions(data=tmp_path, train_steps=0).sizes()


def test_sizes_fit_the_recorded_command():
    chosen = options.BenchOptions(data=Path("/data/dialogsum"), json_path=Path("bench.json"), train_steps=3)
    assert chosen.command() == "dsum bench --device cpu --data /data/dialogsum --json bench.json --train-steps 3"
    assert chosen.sizes().train_steps == 3 and chosen.sizes().eval_dialogues == sizes.CPU_SIZES.eval_dialogues
    chosen = options.BenchOptions(goals=True, data=Path("/d"), profile=Path("profiles"), record=True)
    assert chosen.command() == "dsum bench --goals --device cpu --data /d --record --profile profiles"
