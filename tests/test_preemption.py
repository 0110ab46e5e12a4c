"""Stopping on SIGUSR1 / SIGTERM at a step boundary, and `--resume auto` continuing the run exactly."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny
from dsum.preemption import Stopped
from dsum.cli import train_and_evaluate
from dsum.train import train

# Dropout and a warm-up schedule, so that RNG, scheduler and optimizer state all matter; logging every
# 4 steps, so that the loss of a log window cut by the stop must be carried across the restart.
COMMON = ["train.max_steps=48", "train.lr_scheduler=linear", "train.warmup_steps=4", "adapter.dropout=0.2",
          "train.per_device_batch_size=2", "train.logging_steps=4", "train.save_total_limit=1"]


def losses(run: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def signal_when(run: Path, signum: int, at_step: int) -> threading.Thread:
    """Send `signum` to this process once the run has logged `at_step`."""
    def watch() -> None:
        while not any(step >= at_step for step, _ in (losses(run) if (run / "metrics.jsonl").is_file() else [])):
            time.sleep(0.002)
        os.kill(os.getpid(), signum)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@pytest.fixture
def ctrl_c_reaches_this_process():
    """Ctrl-C as it is in a terminal's foreground: not ignored, as a shell leaves it for a background job."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_at_the_step_boundary_and_resume_auto_finishes_identically(tmp_path, signum,
                                                                                   ctrl_c_reaches_this_process):
    """SLURM's warning (SIGUSR1), its preemption (SIGTERM) and a person's Ctrl-C (SIGINT) alike."""
    straight = tmp_path / "straight"
    train(tiny("t5-lora", straight, *COMMON))

    run = tmp_path / "stopped"
    recipe = tiny("t5-lora", run, *COMMON)
    handler = signal.getsignal(signum)
    watcher = signal_when(run, signum, at_step=4)
    with pytest.raises(Stopped, match=f"stopped on {signal.Signals(signum).name} at step"):
        train_and_evaluate(recipe, resume="auto")
    watcher.join()
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "stopped" and info["stopped_by"] == signal.Signals(signum).name
    stopped_at = info["stopped_at_step"]
    assert 4 <= stopped_at < 48
    assert [p.name for p in (run / "checkpoints").iterdir()] == [f"step-{stopped_at:08d}"]
    assert not (run / "final").exists()
    # The handlers from before are back once the loop is over.
    assert signal.getsignal(signum) == handler

    train_and_evaluate(recipe, resume="auto")
    assert json.loads((run / "run.json").read_text())["status"] == "finished"
    # Every log window is whole, the one the stop cut included.
    assert [s for s, _ in losses(run)] == [s for s, _ in losses(straight)] == list(range(4, 49, 4))
    assert [v for _, v in losses(run)] == pytest.approx([v for _, v in losses(straight)], abs=1e-6)
    a, b = (load_file(r / "final" / "adapter_model.safetensors") for r in (straight, run))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)

    # A requeued job that finds the run finished does nothing.
    before = (run / "final" / "adapter_model.safetensors").read_bytes()
    assert train_and_evaluate(recipe, resume="auto") == run / "final"
    assert (run / "final" / "adapter_model.safetensors").read_bytes() == before


def test_resume_auto_starts_a_run_next_to_the_slurm_logs_and_restarts_one_that_saved_nothing(tmp_path):
    run = tmp_path / "run"
    (run / "slurm").mkdir(parents=True)
    (run / "slurm" / "job.out").write_text("log of the job that is running now\n")
    train_and_evaluate(tiny("t5-lora", run, "train.max_steps=2"), resume="auto")
    assert json.loads((run / "run.json").read_text())["status"] == "finished"
    # A run killed before its first checkpoint (so before final/) starts over; the job's logs stay.
    info = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**info, "status": "running", "trained": False}))
    shutil.rmtree(run / "final")
    train_and_evaluate(tiny("t5-lora", run, "train.max_steps=3"), resume="auto")
    assert [step for step, _ in losses(run)] == [1, 2, 3]
    assert (run / "slurm" / "job.out").read_text() == "log of the job that is running now\n"


def test_a_kill_in_the_middle_of_a_save_leaves_the_previous_checkpoint_to_resume_from(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT, run_dsum

    settings = [*COMMON, "train.max_steps=12", "train.save_steps=4", "train.save_total_limit=2",
                "data.synthetic.train_size=64", "data.synthetic.validation_size=8", "data.synthetic.test_size=5",
                "eval.after_training=false", "tokenizer.vocab_size=400"]
    straight = tmp_path / "straight"
    train(tiny("t5-lora", straight, *settings))

    run = tmp_path / "killed"
    args = ["train", str(ROOT / "recipes" / "tiny" / "t5-lora.yaml"), *settings, f"output_dir={run}", "--resume", "auto"]
    killed = subprocess.run([sys.executable, "-m", "dsum", *args], capture_output=True, text=True, timeout=300,
                            check=False, env={**os.environ, "DSUM_FAULT": "checkpoint.save:kill@8"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    # The save of step 8 was cut short: a .tmp without its marker; step 4 is whole.
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000004", "step-00000008.tmp"]
    assert not (run / "checkpoints" / "step-00000008.tmp" / "COMPLETE").exists()

    resumed = run_dsum(*args)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout and "step-00000004 at step 4" in resumed.stdout
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000004", "step-00000008"]
    assert [v for _, v in losses(run)] == pytest.approx([v for _, v in losses(straight)], abs=1e-6)
    a, b = (load_file(r / "final" / "adapter_model.safetensors") for r in (straight, run))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_a_signal_stops_an_evaluation_after_its_batch_and_the_rerun_generates_only_the_rest(tmp_path):
    from dsum.evaluate import run_eval

    settings = ["train.max_steps=2", "data.synthetic.test_size=64", "eval.batch_size=1", "eval.max_new_tokens=24"]
    recipe = tiny("t5-full", tmp_path / "run", *settings)
    final = train(recipe)
    whole = run_eval(recipe, checkpoint=final, output_dir=tmp_path / "whole", overwrite=False)

    out = tmp_path / "eval"
    partial = out / "partial" / "rank-0.jsonl"
    def watch() -> None:
        while not (partial.is_file() and partial.read_text().count("\n") >= 2):
            time.sleep(0.002)
        os.kill(os.getpid(), signal.SIGUSR1)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    with pytest.raises(Stopped, match="stopped on SIGUSR1 after .* of 64 batches"):
        run_eval(recipe, checkpoint=final, output_dir=out, overwrite=False)
    thread.join()
    done_before = partial.read_text().count("\n")
    assert 2 <= done_before < 64 and not (out / "metrics.json").exists()

    again = run_eval(recipe, checkpoint=final, output_dir=out, overwrite=False)
    assert (out / "predictions.jsonl").read_text() == (tmp_path / "whole" / "predictions.jsonl").read_text()
    assert again["rouge1"] == whole["rouge1"]
    # A requeued evaluation that finds it finished does nothing.
    assert run_eval(recipe, checkpoint=final, output_dir=out, overwrite=False, skip_finished=True) is None


EVALUATING = ["train.max_steps=4", "train.save_steps=2", "eval.after_training=true", "data.synthetic.test_size=6",
              "eval.batch_size=2", "eval.max_new_tokens=6"]


def test_a_stop_while_evaluating_keeps_the_training_and_resume_auto_only_evaluates(tmp_path, monkeypatch):
    """SIGTERM after the first of three generation batches at the end of `dsum train`: the run stops within
    a batch, saying so, with final/ and the predictions so far kept. `--resume auto` (a requeued job) then
    generates the rest and finishes the run, without training again."""
    run = tmp_path / "run"
    monkeypatch.setenv("DSUM_FAULT", "generate.batch:term@1")
    with pytest.raises(Stopped, match="stopped on SIGTERM after 1 of 3 batches"):
        train_and_evaluate(tiny("t5-lora", run, *EVALUATING))
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "stopped" and info["stopped_in"] == "evaluation" and info["trained"] is True
    assert (run / "final" / "adapter_model.safetensors").is_file() and not (run / "eval" / "metrics.json").exists()
    assert len((run / "eval" / "partial" / "rank-0.jsonl").read_text().splitlines()) == 2
    trained = {p: p.read_bytes() for p in [run / "metrics.jsonl", *sorted((run / "final").iterdir())]}
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())

    monkeypatch.delenv("DSUM_FAULT")
    train_and_evaluate(tiny("t5-lora", run, *EVALUATING), resume="auto")
    assert json.loads((run / "run.json").read_text())["status"] == "finished"
    assert json.loads((run / "eval" / "metrics.json").read_text())["n"] == 6
    assert {p: p.read_bytes() for p in trained} == trained  # not trained again
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == checkpoints


def test_ctrl_c_twice_interrupts_at_once_and_the_command_says_so_in_one_line(tmp_path, monkeypatch,
                                                                            ctrl_c_reaches_this_process):
    from conftest import ROOT, run_dsum
    from dsum.preemption import StopSignals

    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGINT)  # the first: recorded, the run stops at its next step
        assert stop.received == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # the second: at once
            time.sleep(1)

    import dsum.train

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(dsum.train, "train", interrupted)
    result = run_dsum("train", str(ROOT / "recipes" / "tiny" / "t5-lora.yaml"), f"output_dir={tmp_path / 'run'}")
    assert result.returncode == 130
    assert result.stderr.strip().splitlines() == ["dsum: interrupted; what was saved before stays (a run continues "
                                                  "with --resume latest)"]


def test_a_background_job_that_ignores_ctrl_c_keeps_ignoring_it():
    from dsum.preemption import StopSignals

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with StopSignals() as stop:
            os.kill(os.getpid(), signal.SIGINT)
            assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN and stop.received is None
    finally:
        signal.signal(signal.SIGINT, previous)
