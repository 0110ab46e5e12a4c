"""Faults on the CPU, injected with DSUM_FAULT: a kill mid-training or mid-evaluation, a write error
while saving, and a non-finite loss. Nothing saved is lost, and a rerun ends where an uninterrupted
run does."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, run_dsum, tiny
from dsum.config import RunError
from dsum.train import train

RECIPE = str(ROOT / "recipes" / "tiny" / "t5-lora.yaml")
SETTINGS = ["data.synthetic.train_size=64", "data.synthetic.validation_size=8", "data.synthetic.test_size=24",
            "eval.after_training=false", "tokenizer.vocab_size=400", "train.per_device_batch_size=2",
            "train.max_steps=12", "train.save_steps=4", "train.save_total_limit=3", "train.logging_steps=1",
            "train.lr_scheduler=linear", "train.warmup_steps=2", "adapter.dropout=0.2", "train.trackers=[]",
            "eval.batch_size=2", "eval.max_new_tokens=12"]


def recipe(run: Path):
    from dsum.config import load_recipe

    return load_recipe(RECIPE, [*SETTINGS, f"output_dir={run}"])


def dsum(*args: str, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **({"DSUM_FAULT": fault} if fault else {})}
    return subprocess.run([sys.executable, "-m", "dsum", *args], capture_output=True, text=True, timeout=300,
                          check=False, env=env)


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "final" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("straight") / "run"
    done = run_dsum("train", RECIPE, *SETTINGS, f"output_dir={out}", "eval.after_training=true")
    assert done.returncode == 0, done.stderr[-2000:]
    return out


def test_kill_9_mid_training_then_resume_latest_gives_the_same_weights(straight, tmp_path):
    run = tmp_path / "run"
    killed = dsum("train", RECIPE, *SETTINGS, f"output_dir={run}", fault="train.step:kill@7")
    assert killed.returncode == -signal.SIGKILL
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000004"]
    train(recipe(run), resume="latest")
    assert losses(run) == pytest.approx(losses(straight), abs=1e-6)
    a, b = weights(run), weights(straight)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_a_write_error_while_saving_is_one_line_and_keeps_the_previous_checkpoint(tmp_path):
    run = tmp_path / "run"
    done = run_dsum("train", RECIPE, *SETTINGS, f"output_dir={run}", env={"DSUM_FAULT": "checkpoint.save:oserror@8"})
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last == (f"dsum: error: could not save the checkpoint of step 8 in {run / 'checkpoints'}: No space left "
                    "on device (injected by DSUM_FAULT); the last complete checkpoint, step-00000004, is intact")
    assert "Traceback" not in done.stderr
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "failed" and info["failure"] == last.removeprefix("dsum: error: ")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000004"]
    before = (run / "checkpoints" / "step-00000004" / "trainer_state.json").read_text()
    assert json.loads(before)["global_step"] == 4
    train(recipe(run), resume="latest")
    assert json.loads((run / "run.json").read_text())["status"] == "finished"


def test_an_unexpected_error_marks_the_run_failed_and_goes_on_up(tmp_path, monkeypatch):
    monkeypatch.setenv("DSUM_FAULT", "train.step:oserror@3")
    run = tmp_path / "run"
    with pytest.raises(OSError, match="injected by DSUM_FAULT"):
        train(tiny("t5-lora", run, "train.max_steps=6", "train.save_steps=2"))
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "failed" and "failed_at" in info
    assert info["failure"] == "OSError: [Errno 28] No space left on device (injected by DSUM_FAULT)"
    # The next command in the same place is told what is there and how to go on.
    from dsum.run_dir import output_dir_problem

    assert output_dir_problem(run, overwrite=False) == (
        f"output_dir {run} already holds a failed run; pass --resume latest to continue it, or pass --overwrite "
        "to replace it")


def test_a_kill_mid_evaluation_resumes_without_regenerating(straight, tmp_path):
    args = ["eval", RECIPE, *SETTINGS, f"output_dir={straight}", "--checkpoint", str(straight / "final")]
    out = tmp_path / "eval"
    killed = dsum(*args, "--output-dir", str(out), fault="generate.batch:kill@5")
    assert killed.returncode == -signal.SIGKILL
    assert (out / "partial" / "rank-0.jsonl").read_text().count("\n") == 10  # 5 batches of 2
    again = run_dsum(*args, "--output-dir", str(out))
    assert again.returncode == 0, again.stderr[-2000:]
    assert "generate: 100%|██████████| 7/7" in again.stderr  # 7 batches for the 14 dialogues left, not 12
    # The same predictions as the evaluation at the end of the uninterrupted run.
    assert (out / "predictions.jsonl").read_text() == (straight / "eval" / "predictions.jsonl").read_text()


def test_a_non_finite_loss_stops_with_its_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("DSUM_FAULT", "train.loss:nan@6")
    run = tmp_path / "run"
    with pytest.raises(RunError, match=r"the loss was not finite at step 6; training stopped"):
        train(tiny("t5-lora", run, "train.max_steps=12", "train.save_steps=4", "train.logging_steps=5"))
    # The loss went bad at step 6: the save at step 8 did not happen, step 4's checkpoint is there.
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000004"]
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "failed" and info["failed_at_step"] == 6


def test_skip_drops_the_update_of_a_non_finite_step_and_counts_it(tmp_path, monkeypatch):
    settings = ["train.max_steps=8", "train.on_nonfinite_loss=skip", "train.logging_steps=1"]
    clean = train(tiny("t5-lora", tmp_path / "clean", *settings)).parent
    monkeypatch.setenv("DSUM_FAULT", "train.loss:nan@3")
    run = train(tiny("t5-lora", tmp_path / "run", *settings)).parent
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "loss" in line]
    assert [r.get("skipped_steps", 0) for r in rows if "loss" in r][:4] == [0, 0, 1, 1]
    assert json.loads((run / "run.json").read_text())["skipped_steps"] == 1
    final = weights(run)
    assert all(torch.isfinite(t).all() for t in final.values())
    # Steps 1-2 trained alike; step 3's update was dropped, so the runs part there.
    assert losses(run)[:2] == pytest.approx(losses(clean)[:2], abs=1e-9)
    assert not any(torch.allclose(final[k], weights(clean)[k]) for k in final if "lora_B" in k)


HOLDER = """
import sys, time
from pathlib import Path
from dsum.run_dir import Lock
assert Lock(Path(sys.argv[1])).acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_one_run_at_a_time_holds_the_directory_until_its_process_ends(tmp_path):
    """Another process holds the output directory (as a run does, from before it writes until it ends): a
    second start is refused in one line, with exit status 2, and changes nothing. Killed, the holder lets
    go with its process, and the next start runs."""
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "held"
        refused = run_dsum("train", RECIPE, *SETTINGS, "train.max_steps=1", f"output_dir={out}")
        assert refused.returncode == 2
        assert refused.stderr.strip().splitlines()[-1] == (f"dsum: error: output_dir {out} is in use by another dsum run "
                                                          "(it holds the directory's lock); wait for it to end, or "
                                                          "choose another output_dir")
        assert "Traceback" not in refused.stderr
        assert not list(out.iterdir())
    finally:
        holder.kill()  # SIGKILL: nothing of the holder's own runs, the kernel drops its lock
        holder.wait()
    started = run_dsum("train", RECIPE, *SETTINGS, "train.max_steps=1", f"output_dir={out}")
    assert started.returncode == 0, started.stderr[-2000:]
    assert json.loads((out / "run.json").read_text())["status"] == "finished"


@pytest.fixture(scope="module")
def a_checkpoint(tmp_path_factory) -> Path:
    """One complete checkpoint of a tiny full fine-tuning run (step 2 of 4), for each damage to start from."""
    out = tmp_path_factory.mktemp("saved") / "run"
    result = run_dsum("train", str(ROOT / "recipes" / "tiny" / "t5-full.yaml"), *SETTINGS, "train.max_steps=4",
                      "train.save_steps=2", f"output_dir={out}")
    assert result.returncode == 0, result.stderr[-2000:]
    shutil.rmtree(out / "final")
    return out


def cut(file: Path, keep: float) -> None:
    file.write_bytes(file.read_bytes()[: int(file.stat().st_size * keep)])


DAMAGES = {  # what happens to a file of the checkpoint, and what the one line then says of it
    "model-deleted": (lambda c: (c / "model.safetensors").unlink(), "model.safetensors is missing"),
    "model-cut-short": (lambda c: cut(c / "model.safetensors", 0.5), "model.safetensors holds"),
    "optimizer-cut-short": (lambda c: cut(c / "optimizer.bin", 0.9), "optimizer.bin holds"),
    "rng-state-cut-short": (lambda c: cut(c / "rng_state_0.pt", 0.5), "rng_state_0.pt holds"),
    "scheduler-emptied": (lambda c: (c / "scheduler.bin").write_bytes(b""), "scheduler.bin holds 0 bytes"),
    "marker-garbled": (lambda c: (c / "COMPLETE").write_text("{"), "COMPLETE is not the list of files"),
    # A checkpoint from before COMPLETE listed its files, whose state holds a recipe that is no mapping.
    "recipe-garbled-in-an-old-checkpoint": (lambda c: (garble_recipe(c), (c / "COMPLETE").write_text("")),
                                            "trainer_state.json holds a recipe that is not a mapping"),
}


def garble_recipe(step: Path) -> None:
    state = json.loads((step / "trainer_state.json").read_text())
    (step / "trainer_state.json").write_text(json.dumps({**state, "recipe": "x"}))


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_checkpoint_is_refused_before_anything_is_written(a_checkpoint, tmp_path, damage):
    """A resume reads every file of the checkpoint; a file missing, cut short or emptied is named in one line
    (exit status 2) before the run writes anything: run.json stays as the interrupted run left it."""
    import shutil as sh

    out = tmp_path / "run"
    sh.copytree(a_checkpoint, out)
    harm, said = DAMAGES[damage]
    harm(out / "checkpoints" / "step-00000002")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    result = run_dsum("train", str(ROOT / "recipes" / "tiny" / "t5-full.yaml"), *SETTINGS, "train.max_steps=4",
                      "train.save_steps=2", f"output_dir={out}", "--resume", "latest")
    assert result.returncode == 2, result.stderr[-2000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("dsum: error: --resume ") and "the checkpoint is damaged" in line and said in line, line
    assert "Traceback" not in result.stderr
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_a_checkpoint_from_before_the_marker_listed_files_is_still_checked_by_its_contents(a_checkpoint, tmp_path):
    import shutil as sh

    out = tmp_path / "run"
    sh.copytree(a_checkpoint, out)
    step = out / "checkpoints" / "step-00000002"
    (step / "COMPLETE").write_text("")  # as checkpoints were written before
    cut(step / "model.safetensors", 0.5)
    result = run_dsum("train", str(ROOT / "recipes" / "tiny" / "t5-full.yaml"), *SETTINGS, "train.max_steps=4",
                      "train.save_steps=2", f"output_dir={out}", "--resume", "latest")
    assert result.returncode == 2 and "model.safetensors is cut short" in result.stderr.splitlines()[-1]


@pytest.fixture
def small_disk(tmp_path):
    """A file system of a few MB, mounted for the test (a tmpfs: it needs root, as CI has)."""
    mounts = []

    def mount(megabytes: int) -> Path:
        where = tmp_path / f"disk-{megabytes}m"
        where.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(where)],
                              capture_output=True, text=True, check=False)
        if done.returncode != 0:
            pytest.skip(f"a real full disk needs a tmpfs mount, which this machine refused ({done.stderr.strip()}); "
                        "the injected write errors above still run")
        mounts.append(where)
        return where

    yield mount
    for where in mounts:
        subprocess.run(["umount", "--lazy", str(where)], check=False)  # detached even while a file is open


@pytest.mark.parametrize("megabytes, saves, what", [(2, 1, "the random-init base"), (6, 1, "the checkpoint of step 1"),
                                                     (5, 0, "final/")])
def test_a_full_disk_ends_the_run_in_one_line_and_leaves_no_partial_files(small_disk, megabytes, saves, what):
    """A real full disk: the base (3.3 MB) does not fit in 2 MB, a checkpoint (10 MB) not in 6 MB, the base
    and final/ not both in 5 MB. Whatever raises the error (the system, safetensors, torch), the run stops
    with exit status 1 and one line, marks itself failed, and leaves no half-written directory."""
    out = small_disk(megabytes) / "run"
    result = run_dsum("train", str(ROOT / "recipes" / "tiny" / "t5-full.yaml"), *SETTINGS, "train.max_steps=2",
                      f"train.save_steps={saves or 'null'}", f"output_dir={out}")
    assert result.returncode == 1, result.stderr[-2000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("dsum: error: could not ") and what in line, line
    assert "Traceback" not in result.stderr
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "failed" and what in run["failure"]


def test_a_kill_while_evaluating_after_training_resumes_the_evaluation_not_the_training(tmp_path):
    """SIGKILL after the first generation batch at the end of `dsum train` (run.json still says running):
    `--resume auto`, as a requeued job runs, finishes the evaluation from the predictions kept, and trains
    nothing again."""
    out = tmp_path / "run"
    settings = [*SETTINGS, "train.max_steps=4", "eval.after_training=true", "data.synthetic.test_size=6",
                f"output_dir={out}"]
    killed = dsum("train", RECIPE, *settings, fault="generate.batch:kill@1")
    assert killed.returncode == -signal.SIGKILL
    assert json.loads((out / "run.json").read_text())["status"] == "running"
    trained = (out / "metrics.jsonl").read_bytes()
    resumed = run_dsum("train", RECIPE, *settings, "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "evaluation did not finish; evaluating" in resumed.stdout
    assert (out / "metrics.jsonl").read_bytes() == trained
    assert json.loads((out / "eval" / "metrics.json").read_text())["n"] == 6
    assert json.loads((out / "run.json").read_text())["status"] == "finished"
