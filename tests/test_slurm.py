"""End to end on a real SLURM (one node on loopback, started by the fixture): `dsum submit` with two CPU
ranks trains exactly as a local launch does; a job warned with SIGUSR1 checkpoints, requeues and
finishes identically; a kill in the middle of a checkpoint save leaves a run that resumes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT
from slurm_cluster import slurm_cluster
from test_distributed import free_port

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

RECIPE = str(ROOT / "recipes" / "tiny" / "t5-lora.yaml")
# Enough steps that a signal sent at step 4 arrives long before the end; dropout and warm-up, so that
# RNG, optimizer and scheduler state must all survive a restart for the weights to match.
SETTINGS = ["data.synthetic.train_size=64", "data.synthetic.validation_size=8", "eval.after_training=false",
            "tokenizer.vocab_size=400", "train.per_device_batch_size=2", "train.max_steps=80",
            "train.logging_steps=4", "train.save_steps=8", "train.save_total_limit=2", "train.lr_scheduler=linear",
            "train.warmup_steps=4", "adapter.dropout=0.2", "train.trackers=[]"]
BIN = str(Path(sys.executable).parent)  # `dsum` and `accelerate` for the job, as an activated environment gives


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with slurm_cluster(tmp_path_factory.mktemp("slurm")) as running:
        yield running


@pytest.fixture(scope="module")
def local_run(tmp_path_factory) -> Path:
    """The reference: the same recipe launched by hand on two CPU ranks."""
    out = tmp_path_factory.mktemp("local") / "run"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "accelerate_configs" / "ddp.yaml"), "--num_processes", "2", "--main_process_port",
               str(free_port()), "-m", "dsum", "train", RECIPE, *SETTINGS, f"output_dir={out}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False,
                          env={**os.environ, "ACCELERATE_USE_CPU": "true"})
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def submit(cluster, out: Path, env: dict[str, str] | None = None) -> str:
    command = [sys.executable, "-m", "dsum", "submit", RECIPE, "--nodes", "1", "--gpus-per-node", "0",
               "--procs-per-node", "2", "--port", str(free_port()), "--time", "00:30:00", *SETTINGS,
               f"output_dir={out}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False, cwd=ROOT,
                          env={**cluster.env, "PATH": f"{BIN}:{cluster.env['PATH']}", **(env or {})})
    assert done.returncode == 0, done.stderr
    return re.search(r"submitted job (\d+)", done.stdout).group(1)


def job_log(out: Path, job: str) -> str:
    return (out / "slurm" / f"dsum-train-{job}.out").read_text()


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def assert_same_run(run: Path, reference: Path) -> None:
    assert json.loads((run / "run.json").read_text())["status"] == "finished"
    assert losses(run) == pytest.approx(losses(reference), abs=1e-6)
    ours, theirs = (load_file(r / "final" / "adapter_model.safetensors") for r in (run, reference))
    assert ours.keys() == theirs.keys() and all(torch.allclose(ours[k], theirs[k], atol=1e-6) for k in ours)


def test_a_submitted_job_trains_as_a_local_launch_does(cluster, local_run, tmp_path):
    out = tmp_path / "run"
    job = submit(cluster, out)
    assert cluster.wait_job(job, timeout=600) == "COMPLETED", job_log(out, job)
    assert_same_run(out, local_run)
    assert json.loads((out / "run.json").read_text())["world_size"] == 2
    log = job_log(out, job)
    assert "1 node(s) x 2 process(es)" in log and re.search(r"wall time \d+ s, exit status 0", log)
    node_log = out / "slurm" / f"job-{job}-run-0" / "node-0.log"
    assert "train: 100%" in node_log.read_text()
    rank_logs = sorted((out / "slurm" / f"job-{job}-run-0" / "ranks").rglob("stdout.log"))
    assert len(rank_logs) == 2  # one per rank


def test_sigusr1_checkpoints_requeues_and_finishes_as_an_uninterrupted_run(cluster, local_run, tmp_path):
    out = tmp_path / "run"
    job = submit(cluster, out)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.is_file() and len(losses(out)) >= 1):  # training is under way: step 4 is logged
        assert time.monotonic() < deadline, job_log(out, job)
        time.sleep(0.1)
    cluster.run("scancel", "--signal=USR1", "--batch", job)
    assert cluster.wait_job(job, timeout=600) == "COMPLETED", job_log(out, job)
    log = job_log(out, job)
    assert "SIGUSR1" in log and f"requeueing job {job}" in log
    first = (out / "slurm" / f"job-{job}-run-0" / "node-0.log").read_text()
    second = (out / "slurm" / f"job-{job}-run-1" / "node-0.log").read_text()
    stopped = int(re.search(r"stopped on SIGUSR1 at step (\d+)", first).group(1))
    assert 4 <= stopped < 80
    assert f"at step {stopped}" in re.search(r"resumed from .*", second).group(0)
    assert_same_run(out, local_run)


def test_a_kill_during_a_checkpoint_save_resumes_from_the_previous_one(cluster, local_run, tmp_path):
    out = tmp_path / "run"
    job = submit(cluster, out, env={"DSUM_FAULT": "checkpoint.save:kill@16"})  # both ranks, mid-save of step 16
    assert cluster.wait_job(job, timeout=600) != "COMPLETED"
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert checkpoints == ["step-00000008", "step-00000016.tmp"]
    assert json.loads((out / "run.json").read_text())["status"] == "running"

    again = submit(cluster, out)
    assert cluster.wait_job(again, timeout=600) == "COMPLETED", job_log(out, again)
    assert "resumed from" in (out / "slurm" / f"job-{again}-run-0" / "node-0.log").read_text()
    assert_same_run(out, local_run)
