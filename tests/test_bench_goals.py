"""`dsum bench --goals`: one tiny run of the CPU stand-ins on the real DialogSum files checks that the
epoch is one epoch, the packed rows are the sequence length, and the figures are the run's own; the
GPU workloads are checked up to the GPU (their recipes), and the goals' verdicts on made-up figures.
No speed goal is asserted here."""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import DIALOGSUM
from dsum.bench import dsum_way, goals, harness, inputs, options, peers, sizes
from dsum.cli import main
from dsum.data import load_split
from dsum.config import validate_recipe
from dsum.features import Featurizer


TRAIN_EXAMPLES, WARMUP, TRAIN_STEPS, EVAL_DIALOGUES = 100, 1, 2, 4


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The goals run of both CPU stand-ins, through the command line, on one thread, profiled, its results
    recorded (`--record`) under the directory it ran in; (results, stdout, workdir)."""
    out = tmp_path_factory.mktemp("goals")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    patch = pytest.MonkeyPatch()
    patch.setitem(sizes.SIZES, "cpu", replace(sizes.CPU_SIZES, train_examples=TRAIN_EXAMPLES, warmup_steps=WARMUP))
    patch.chdir(out)
    stdout = io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout):
            status = main(["bench", "--goals", "--data", str(DIALOGSUM), "--record",
                           "--train-steps", str(TRAIN_STEPS), "--eval-dialogues", str(EVAL_DIALOGUES),
                           "--workdir", str(out / "work"), "--profile", "profiles",
                           "--dsum", "train.fast_cpu_dropout=false"])
    finally:
        patch.undo()
        torch.set_num_threads(threads)
        harness.fresh_state(0)
    assert status == 0, stdout.getvalue()[-2000:]
    [recorded] = (out / "benchmarks" / "results").iterdir()
    return json.loads(recorded.read_text()), stdout.getvalue(), out / "work"


def test_the_epoch_covers_every_training_example_once_and_reports_its_own_loop(run):
    results, stdout, workdir = run
    t5 = results["workloads"]["t5"]
    figures = t5["figures"]
    run_json = json.loads((workdir / "t5" / "run.json").read_text())
    assert figures["train_examples"] == TRAIN_EXAMPLES and t5["settings"]["epoch"]
    assert figures["steps"] == run_json["steps_per_epoch"] == run_json["total_steps"]
    epochs = [json.loads(line)["epoch"] for line in (workdir / "t5" / "metrics.jsonl").read_text().splitlines()]
    assert epochs[-1] == 1.0
    assert figures["train_seconds"] == run_json["telemetry"]["loop_seconds"]
    # Every real token of the 100 examples, once, over the loop's seconds.
    from transformers import AutoTokenizer

    recipe = validate_recipe(run_json["recipe"])
    features = Featurizer(recipe, AutoTokenizer.from_pretrained(workdir / "tokenizer")).training_features(
        load_split(recipe.data, "train")[:TRAIN_EXAMPLES])
    real = peers.feature_real_tokens(features, "seq2seq")
    assert figures["real_tokens_per_second"] * figures["train_seconds"] == pytest.approx(real, rel=1e-6)
    assert t5["settings"]["group_by_length"] and t5["settings"]["max_tokens_per_batch"] > 0
    assert "t5 (3,032,832 parameters, full fine-tuning; one epoch" in stdout


def test_the_llama_trains_on_packed_rows_of_the_sequence_length_over_the_timed_steps(run):
    results, stdout, workdir = run
    llama = results["workloads"]["llama"]
    assert llama["settings"]["packing"] and llama["settings"]["max_tokens_per_batch"] == 1024
    assert llama["settings"]["sequence_length"] == 1024 and not llama["settings"]["epoch"]
    assert llama["figures"]["steps"] == WARMUP + TRAIN_STEPS
    assert llama["figures"]["padding_efficiency"] == 1.0
    # The timed window: the steps after the warm-up, from the run's own telemetry.
    timed = json.loads((workdir / "llama" / "run.json").read_text())["telemetry"]["after_step"]
    assert (timed["from_step"], timed["steps"]) == (WARMUP, TRAIN_STEPS)
    assert llama["figures"]["train_seconds"] == timed["seconds"]
    assert llama["figures"]["real_tokens_per_second"] == pytest.approx(timed["real_tokens"] / timed["seconds"])
    assert llama["figures"]["model_tflops_per_second"] == timed["model_tflops_per_second"]
    assert "packed rows of 1024 tokens" in stdout


def test_generation_covers_every_test_dialogue(run):
    results, _, _ = run
    figures = results["workloads"]["t5"]["figures"]
    assert figures["eval_dialogues_per_second"] * figures["eval_seconds"] == pytest.approx(EVAL_DIALOGUES)
    assert figures["eval_mean_new_tokens"] > 0
    assert "eval_seconds" not in results["workloads"]["llama"]["figures"]


def test_the_cpu_run_has_no_goals_and_says_so(run):
    results, stdout, _ = run
    assert results["goals_met"] is None
    assert all(not w["goals"] for w in results["workloads"].values())
    assert "goals: none on this device" in stdout
    assert results["command"].startswith("dsum bench --goals --device cpu --data ")
    assert results["machine"]["torch"] == torch.__version__
    # `--dsum` over the workloads' own settings, named in the command and the settings each workload ran with.
    assert results["command"].endswith(" --dsum train.fast_cpu_dropout=false")
    assert [w["settings"]["fast_cpu_dropout"] for w in results["workloads"].values()] == [False, False]
    assert "dsum ran with train.fast_cpu_dropout=false (--dsum) over the workloads' settings" in stdout


def test_the_results_are_recorded_under_a_name_that_says_when_where_what_and_which_code(run):
    import re

    results, stdout, workdir = run
    [recorded] = (workdir.parent / "benchmarks" / "results").iterdir()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d{6}Z-cpu-goals-([0-9a-f]{7}(-dirty)?|nogit)\.json", recorded.name), \
        recorded.name
    assert recorded.name == options.record_name(results["date"], "cpu", "goals", results["commit"], results["dirty"])
    assert " --record " in results["command"] and f"results: {Path('benchmarks/results') / recorded.name}" in stdout


def test_each_workload_is_profiled_early_in_its_training(run):
    """The epoch's profile: 3 steps after the warm-up step; the Llama's: its 2 timed steps."""
    results, stdout, workdir = run
    profiles = workdir.parent / "profiles"
    assert results["profile_dir"] == str(profiles)
    summary = json.loads((profiles / "summary.json").read_text())["runs"]
    assert set(summary) == {"t5-goals", "llama-goals"}
    for name, steps in (("t5-goals", [2, 3, 4]), ("llama-goals", [2, 3])):
        record = json.loads((profiles / f"{name}.json").read_text())
        assert record["optimizer_steps"] == steps and record["profiled_steps"] == record["schedule"]["active"], name
        assert any(row["name"] == "aten::mm" for row in record["top_by_self_cpu"][:10]), name
        assert (profiles / f"{name}.txt").is_file() and f"profile {name}: {len(steps)} steps of " in stdout
        workload = results["workloads"][name.removesuffix("-goals")]
        assert workload["profile"]["profiled_steps"] == len(steps)
        assert workload["profile"]["mean_step_ms"] == record["mean_step_ms"]


def _data(workdir: Path, examples: int = 50) -> inputs.BenchData:
    """Enough of BenchData for the recipes: the DialogSum directory, a few examples, the trained tokenizer."""
    from dsum.config import DataConfig

    train = load_split(DataConfig(source=str(DIALOGSUM)), "train")[:examples]
    return inputs.BenchData(DIALOGSUM, train, [], examples, workdir / "tokenizer", 0.0, 0.0)


def test_gpu_workloads_run_the_repository_recipes_with_their_shapes(run, tmp_path):
    """Everything before the GPU: each workload's recipe, built on the bench's tokenizer."""
    _, _, workdir = run
    recipes = {w.model: goals.workload_recipe(options.select_models("cuda", [w.model])[0], w, sizes.CUDA_SIZES,
                                                    _data(workdir), tmp_path / "base", tmp_path / w.model)
               for w in goals.WORKLOADS["cuda"]}
    t5, qlora, lora = recipes["flan-t5-base"], recipes["llama-2-7b-qlora"], recipes["llama-2-7b-lora"]
    assert t5.train.num_epochs == 1 and t5.train.max_steps is None and t5.data.max_train_samples is None
    # As many tokens a micro-batch as fit the GPU: the epoch's 20 s leave no room for the bench's small batches.
    assert t5.train.group_by_length and t5.train.max_tokens_per_batch == "auto" and not t5.train.packing
    assert t5.eval.batch_size == 512 and t5.eval.max_new_tokens == sizes.CUDA_SIZES.max_new_tokens
    assert t5.train.mixed_precision == "bf16" and t5.train.learning_rate == 1e-5  # recipes/flan-t5-base/full.yaml
    for llama in (qlora, lora):
        assert llama.train.packing and llama.train.max_tokens_per_batch == 1024
        assert llama.train.max_steps == sizes.CUDA_SIZES.warmup_steps + sizes.CUDA_SIZES.train_steps
        assert llama.train.gradient_checkpointing and llama.model.dtype == "bfloat16"
    assert qlora.adapter.method == "qlora" and qlora.train.optimizer == "paged_adamw_8bit"
    assert lora.adapter.method == "lora" and lora.train.optimizer == "adamw"
    for workload in goals.WORKLOADS["cuda"]:  # a goal names a figure the run reports
        assert workload.goals and set(workload.goals) <= set(goals.FIGURES), workload.model


def test_goals_are_judged_by_their_sign():
    judge = goals.judge
    assert judge(19.5, ("<=", 20.0)) == {"value": 19.5, "goal": "<= 20", "met": True}
    assert judge(20.5, ("<=", 20.0))["met"] is False
    assert judge(5000.0, (">=", 5000.0))["met"] is True and judge(4999.0, (">=", 5000.0))["met"] is False
    assert judge(None, (">=", 0.25))["met"] is None
    with pytest.raises(ValueError, match="'<=' or '>='"):
        judge(1.0, ("<", 2.0))


def test_one_missed_goal_is_a_miss_whatever_was_not_measured():
    assert goals.overall([True, False, None]) is False
    assert goals.overall([True, None]) is None and goals.overall([]) is None
    assert goals.overall([True, True]) is True


def test_a_missed_goal_is_reported_as_missed():
    workload = {"parameters": 10, "adapter": "qlora", "settings": {"epoch": False, "sequence_length": 1024},
                "figures": {"real_tokens_per_second": 4000.0, "peak_gpu_reserved_gib": 9.0},
                "goals": {"real_tokens_per_second": goals.judge(4000.0, (">=", 5000.0)),
                          "peak_gpu_reserved_gib": goals.judge(9.0, ("<=", 10.0)),
                          "mfu": goals.judge(None, (">=", 0.25))}}
    met = goals.overall([goal["met"] for goal in workload["goals"].values()])
    text = goals.format_goals({"goals_met": met, "workloads": {"llama-2-7b-qlora": workload},
                                     "dsum_options": ["eval.batch_size=32"],
                                     "machine": {"gpu": "NVIDIA H100 80GB HBM3", "torch": "2"}, "wall_seconds": 1})
    lines = [" ".join(line.split()) for line in text.splitlines()]
    assert "train real tokens/s 4,000 [>= 5000: missed]" in lines
    assert "peak GPU reserved, GiB 9.00 [<= 10: met]" in lines
    assert "MFU n/a [>= 0.25: not measured on this device]" in lines
    assert "goals: some missed" in lines and "machine: NVIDIA H100 80GB HBM3, torch 2; total wall time: 1s" in lines
    assert "dsum ran with eval.batch_size=32 (--dsum) over the workloads' settings" in lines


@pytest.mark.parametrize("args, message", [
    (["--notebook-rows", "3"], "--notebook-rows: --goals times dsum alone, with no notebook way; leave it out"),
    (["--models", "t5,flan-t5-large"], "--models: flan-t5-large has no goals run on cpu; choose from t5, llama"),
])
def test_goals_options_are_checked_in_one_line(args, message, capsys, tmp_path):
    assert main(["bench", "--goals", "--data", str(tmp_path), *args]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"dsum: error: {message}"]


def test_gpu_peaks_are_reset_for_each_run_on_a_gpu_only(monkeypatch):
    from dsum.telemetry import reset_gpu_peaks

    calls = []
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", calls.append)
    reset_gpu_peaks(torch.device("cpu"))
    assert calls == []
    reset_gpu_peaks(torch.device("cuda", 1))
    assert calls == [torch.device("cuda", 1)]
