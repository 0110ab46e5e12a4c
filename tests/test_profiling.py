"""dsum.profiling: the busy share on made-up kernel timelines, the schedule that fits a run's steps, and
a real torch.profiler run over a small model's steps on the CPU; and how a bench's results name the
commit and the file --record writes."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.autograd import DeviceType

from dsum import run_info
from dsum.bench import options
from dsum.profiling import HOST_CALLS, SUMMARY, Schedule, StepProfiler, analyse, brief, busy_share, describe


def test_overlapping_kernels_count_once():
    # Two kernels overlapping on [20, 30] on different streams, then one alone: busy 10..40 and 60..70.
    assert busy_share([(10, 30), (20, 40), (60, 70)], (0, 100)) == pytest.approx(0.4)
    assert busy_share([(20, 40), (10, 30), (60, 70), (25, 35)], (0, 100)) == pytest.approx(0.4)  # any order
    assert busy_share([(0, 100), (10, 20)], (0, 100)) == pytest.approx(1.0)  # one nested in another


def test_gaps_leave_the_gpu_idle():
    assert busy_share([], (0, 50)) == 0.0
    assert busy_share([(0, 5), (10, 15), (20, 25)], (0, 50)) == pytest.approx(0.3)


def test_kernels_outside_the_steps_are_cut_off():
    # A kernel from the step before the profiled ones runs into them; one runs past their end.
    assert busy_share([(-50, 10), (90, 200)], (0, 100)) == pytest.approx(0.2)
    assert busy_share([(-50, -10), (120, 200)], (0, 100)) == 0.0
    with pytest.raises(ValueError, match="span nothing"):
        busy_share([(0, 1)], (5, 5))


def test_the_schedule_falls_after_the_warm_up_and_inside_the_steps():
    # The tracer's warm-up on the run's last warm-up step, then up to 3 recorded steps.
    assert Schedule.after(3, 9) == Schedule(wait=2, warmup=1, active=3)
    assert Schedule.after(2, 4) == Schedule(wait=1, warmup=1, active=2)  # only 2 steps after the warm-up
    assert Schedule.after(1, 2) == Schedule(wait=0, warmup=1, active=1)
    assert Schedule.after(3) == Schedule(wait=2, warmup=1, active=3)  # an epoch: steps not known
    for warmup, steps in ((0, 5), (3, 3)):
        with pytest.raises(ValueError, match="a profile needs a warm-up step and a step after it"):
            Schedule.after(warmup, steps)


def event(name: str, start: float, end: float, *, device: str | None = None, self_cpu: float | None = None,
          device_us: float = 0.0, trace_name: str | None = None) -> SimpleNamespace:
    """What analyse reads of a torch FunctionEvent; `device`: its Kineto activity type on the GPU."""
    cpu = 0.0 if device else end - start
    return SimpleNamespace(name=name, trace_name=trace_name, time_range=SimpleNamespace(start=start, end=end),
                           device_type=DeviceType.CUDA if device else DeviceType.CPU, is_async=False,
                           activity_type=device or "cpu_op",
                           self_cpu_time_total=cpu if self_cpu is None else self_cpu, cpu_time_total=cpu,
                           self_device_time_total=end - start if device else device_us,
                           device_time_total=end - start if device else device_us)


def test_a_gpu_profile_is_read_from_its_events():
    """Two steps of 100 µs that ended, and a third range the run left open (post-loop work in it). The
    profiler also marks the step ranges and a synchronisation on the GPU's timeline: not kernels."""
    steps = [event("ProfilerStep*", 100 * n, 100 * (n + 1), trace_name=f"ProfilerStep#{n + 2}") for n in range(3)]
    steps[-1].time_range.end = 900
    marks = [event("ProfilerStep*", 15, 195, device="gpu_user_annotation", trace_name="ProfilerStep#2"),
             event("cudaStreamSynchronize", 150, 193, device="cuda_sync")]
    host = [event("aten::mm", 10, 30, device_us=60), event("cudaLaunchKernel", 12, 15),
            event("cudaLaunchKernel", 22, 25), event("aten::add", 110, 118, device_us=20),
            event("cudaLaunchKernel", 112, 116), event("aten::item", 140, 195, self_cpu=5),
            event("aten::_local_scalar_dense", 141, 194, self_cpu=4), event("cudaMemcpyAsync", 142, 150),
            event("cudaStreamSynchronize", 150, 193), event("aten::save", 300, 800)]
    kernels = [event("gemm", 20, 70, device="kernel"), event("gemm", 60, 90, device="kernel"),  # overlapping
               event("add_kernel", 120, 140, device="kernel"),
               event("Memcpy DtoH (Device -> Pinned)", 185, 190, device="gpu_memcpy"),
               event("save_kernel", 400, 500, device="kernel")]  # after the loop: not a profiled step's
    record = analyse([*steps, *marks, *host, *kernels], "flan-t5-base-dsum", "cuda",
                     Schedule(wait=1, warmup=1, active=3), steps_called=4)
    assert record["profiled_steps"] == 2 and record["optimizer_steps"] == [3, 4] and record["step_ms"] == [0.1, 0.1]
    assert record["device_busy_share"] == pytest.approx((70 + 20) / 200)  # 20..90 and 120..140, copies not kernels
    assert record["kernels_per_step"] == 1.5 and record["device_copies"] == {"calls": 1, "us": 5}
    calls = record["host_calls"]
    assert calls["cudaLaunchKernel"] == {"calls": 3, "us": 10}
    assert calls["cudaStreamSynchronize"] == {"calls": 1, "us": 43}  # the host's, not the mark on the GPU
    assert calls["cudaMemcpy"]["calls"] == 1 and calls["aten::item"]["us"] == 55
    assert calls["aten::_local_scalar_dense"]["us"] == 53 and calls["cudaDeviceSynchronize"]["calls"] == 0
    assert [row["name"] for row in record["top_by_self_device"][:2]] == ["aten::mm", "aten::add"]
    assert record["top_by_self_cpu"][0]["name"] == "cudaStreamSynchronize"
    assert "aten::save" not in [row["name"] for row in record["top_by_self_cpu"]]
    assert [k["name"] for k in record["top_kernels"]] == ["gemm", "add_kernel"]  # copies are counted apart
    text = describe(record)
    assert text.startswith("profile flan-t5-base-dsum: 2 steps of 0.1 ms, GPU busy 45.0%, 2 kernels a step; top by "
                           "self device time: aten::mm ") and "no device" not in text


def train_steps(profile: StepProfiler, steps: int) -> None:
    """A small MLP's optimizer steps, each followed by `profile.step()`."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 64))
    optimizer = torch.optim.AdamW(model.parameters())
    with profile:
        for _ in range(steps):
            model(torch.randn(16, 64)).pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
            profile.step()


def test_a_cpu_profile_records_the_scheduled_steps_and_writes_its_files(tmp_path, capsys):
    profile = StepProfiler(tmp_path / "profiles", "mlp-a", "cpu", Schedule.after(2, 6))
    train_steps(profile, 6)
    record = json.loads((tmp_path / "profiles" / "mlp-a.json").read_text())
    assert record == profile.record
    assert record["profiled_steps"] == 3 and record["optimizer_steps"] == [3, 4, 5]
    assert len(record["step_ms"]) == 3 and record["mean_step_ms"] == pytest.approx(sum(record["step_ms"]) / 3)
    names = [row["name"] for row in record["top_by_self_cpu"]]
    assert "aten::addmm" in names and "aten::gelu" in names and not any(n.startswith("ProfilerStep") for n in names)
    assert {"calls", "self_cpu_us", "total_cpu_us", "self_device_us", "total_device_us"} <= set(
        record["top_by_self_cpu"][0])
    # No device timeline on the CPU: said, not made up.
    assert record["device_busy_share"] is None and record["top_by_self_device"] is None
    assert record["top_by_self_cpu"][0]["self_device_us"] is None and record["kernels_per_step"] is None
    assert set(record["host_calls"]) == set(HOST_CALLS) and record["host_calls"]["cudaLaunchKernel"]["calls"] == 0
    text = (tmp_path / "profiles" / "mlp-a.txt").read_text()
    assert "optimizer steps 3, 4, 5" in text and "aten::addmm" in text
    assert "not available: a CPU run has no device time" in text
    assert capsys.readouterr().out.startswith("profile mlp-a: 3 steps of ")
    assert brief(record)["top"] and brief(record)["profiled_steps"] == 3


def test_summary_json_holds_every_run_profiled_into_the_directory(tmp_path):
    for name in ("mlp-a", "mlp-b"):
        train_steps(StepProfiler(tmp_path, name, "cpu", Schedule.after(1, 3)), 3)
    summary = json.loads((tmp_path / SUMMARY).read_text())
    assert set(summary["runs"]) == {"mlp-a", "mlp-b"}
    assert summary["runs"]["mlp-b"] == json.loads((tmp_path / "mlp-b.json").read_text())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlp-a.json", "mlp-a.txt", "mlp-b.json", "mlp-b.txt",
                                                          SUMMARY]


def test_a_run_shorter_than_the_schedule_says_how_many_steps_it_profiled(tmp_path):
    profile = StepProfiler(tmp_path, "short", "cpu", Schedule.after(2, None))
    train_steps(profile, 3)  # the schedule wanted steps 3 to 5
    assert profile.record["profiled_steps"] == 1 and profile.record["schedule"]["active"] == 3
    profile = StepProfiler(tmp_path, "none", "cpu", Schedule.after(3, None))
    train_steps(profile, 2)
    assert profile.record["profiled_steps"] == 0 and profile.record["mean_step_ms"] is None
    assert "0 steps of n/a" in describe(profile.record)


def test_without_a_directory_nothing_is_recorded_or_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for profile in (StepProfiler(None, "t5-dsum", "cpu", Schedule.after(1, 3)), StepProfiler.off()):
        train_steps(profile, 3)
        assert profile.record is None
    assert list(tmp_path.iterdir()) == []


def test_a_failed_run_stops_the_profiler_and_writes_nothing(tmp_path):
    profile = StepProfiler(tmp_path, "failed", "cpu", Schedule.after(1, 4))
    with pytest.raises(RuntimeError, match="the loss was not finite"):
        with profile:
            profile.step()
            profile.step()
            raise RuntimeError("the loss was not finite")
    assert profile.record is None and list(tmp_path.iterdir()) == []
    assert not torch.autograd._profiler_enabled()


def test_profile_names_make_plain_file_names():
    for name in ("t5/dsum", "../t5", "t5 dsum", ""):
        with pytest.raises(ValueError, match="expected letters, digits"):
            StepProfiler(None, name, "cpu", Schedule.after(1, 3))


def test_record_names_carry_date_device_kind_and_commit():
    sha = "2ea07b4301079167c2b38f1d01766862deca9305"
    assert options.record_name("2026-12-04T14:05:12+00:00", "cuda", "bench", sha, False) == \
        "2026-12-04T140512Z-cuda-bench-2ea07b4.json"
    assert options.record_name("2026-12-04T15:05:12+01:00", "cpu", "goals", sha, True) == \
        "2026-12-04T140512Z-cpu-goals-2ea07b4-dirty.json"
    assert options.record_name("2026-12-04T14:05:12+00:00", "cpu", "bench", None, None) == \
        "2026-12-04T140512Z-cpu-bench-nogit.json"
    chosen = options.BenchOptions(device="cuda", record=True)
    results = {"date": "2026-12-04T14:05:12+00:00", "commit": sha, "dirty": False}
    assert chosen.results_path(results) == Path("benchmarks/results/2026-12-04T140512Z-cuda-bench-2ea07b4.json")
    assert options.BenchOptions(json_path=Path("b.json")).results_path(results) == Path("b.json")


def test_the_commit_is_the_checkouts_and_none_elsewhere(tmp_path, monkeypatch):
    root = Path(run_info.__file__).resolve().parents[1]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True)
    found = run_info.source_checkout()
    assert found["commit"] == (head.stdout.strip() if head.returncode == 0 else None)
    assert isinstance(found["dirty"], bool) if head.returncode == 0 else found["dirty"] is None
    # A copy of the package outside any repository, and one installed inside some other repository.
    other = tmp_path / "project"
    (other / "lib" / "dsum").mkdir(parents=True)
    (tmp_path / "dsum").mkdir()
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "init.defaultBranch=main"]
    subprocess.run([*git, "init", "-q", str(other)], check=True)
    subprocess.run([*git, "-C", str(other), "commit", "-q", "--allow-empty", "-m", "x"], check=True)
    for package in (tmp_path / "dsum", other / "lib" / "dsum"):
        monkeypatch.setattr(run_info, "__file__", str(package / "run_info.py"))
        assert run_info.source_checkout() == {"commit": None, "dirty": None}, package


def test_dsums_loop_tells_the_profiler_of_each_optimizer_step(tmp_path):
    """Once per optimizer step, not per micro-batch: 5 steps of 2 accumulated micro-batches."""
    from conftest import tiny
    from dsum.train import train

    recipe = tiny("t5-lora", tmp_path / "run", "train.max_steps=5", "train.gradient_accumulation_steps=2",
                  "train.per_device_batch_size=2")
    profile = StepProfiler(tmp_path / "profiles", "tiny-t5", "cpu", Schedule.after(2, 5))
    train(recipe, profile=profile)
    assert profile.steps_called == 5
    assert profile.record["optimizer_steps"] == [3, 4, 5] and profile.record["profiled_steps"] == 3
    assert (tmp_path / "profiles" / "tiny-t5.json").is_file()
