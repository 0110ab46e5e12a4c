"""`dsum submit` and the launch scripts, without a scheduler: what is rendered, and what is refused."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import ROOT

RECIPE = str(ROOT / "recipes" / "tiny" / "t5-lora.yaml")


def dsum(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dsum", *args], capture_output=True, text=True, timeout=120,
                          check=False, cwd=ROOT, env={**os.environ, **(env or {})})


def sbatch_lines(script: str) -> list[str]:
    return [line.removeprefix("#SBATCH ") for line in script.splitlines() if line.startswith("#SBATCH ")]


def test_dry_run_renders_a_whole_multi_node_script(tmp_path):
    out = tmp_path / "run"
    done = dsum("submit", RECIPE, "--nodes", "4", "--gpus-per-node", "8", "--accelerate", "multi_node_zero3",
                "--time", "12:00:00", "--partition", "gpu", "--signal-seconds", "600", "--sbatch=--qos=high",
                "--dry-run", "train.learning_rate=3e-4", f"output_dir={out}")
    assert done.returncode == 0, done.stderr
    script = done.stdout
    assert sbatch_lines(script) == [
        "--job-name=dsum-train", "--nodes=4", "--ntasks-per-node=1", "--gpus-per-node=8", "--time=12:00:00",
        "--partition=gpu", "--requeue", "--signal=B:USR1@600", "--open-mode=append",
        f"--output={out}/slurm/%x-%j.out", f"--chdir={ROOT}", "--qos=high"]
    assert "4 node(s) x 8 process(es) = 32 processes" in script
    assert f"export DSUM_ACCELERATE_CONFIG={ROOT}/accelerate_configs/multi_node_zero3.yaml" in script
    assert "DSUM_PROCS_PER_NODE" not in script.split("set -- ")[0]  # GPUs per node come from SLURM
    assert "ACCELERATE_USE_CPU" not in script.split("set -- ")[0]
    assert f"set -- {out}/slurm/train.recipe.yaml" in script
    # launch/common.sh is inlined: the script needs nothing from the repository but the configs it names.
    assert "source " not in script.replace('source "$DSUM_ENV_FILE"', "")
    assert "dsum_launch train \"$@\" --resume auto" in script
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)
    assert not out.exists(), "a dry run writes nothing"


def test_cpu_jobs_name_their_process_count_and_use_gloo_unless_deepspeed(tmp_path):
    ddp = dsum("submit", RECIPE, "--nodes", "1", "--gpus-per-node", "0", "--procs-per-node", "2", "--dry-run",
               f"output_dir={tmp_path}")
    assert "export DSUM_PROCS_PER_NODE=2" in ddp.stdout and "export ACCELERATE_USE_CPU=true" in ddp.stdout
    assert "--gpus-per-node" not in "\n".join(sbatch_lines(ddp.stdout))
    zero3 = dsum("submit", RECIPE, "--nodes", "1", "--gpus-per-node", "0", "--procs-per-node", "2",
                 "--accelerate", "zero3", "--dry-run", f"output_dir={tmp_path}")
    assert "export DSUM_PROCS_PER_NODE=2" in zero3.stdout and "ACCELERATE_USE_CPU" not in zero3.stdout
    fsdp = dsum("submit", RECIPE, "--nodes", "1", "--gpus-per-node", "0", "--procs-per-node", "2",
                "--accelerate", "fsdp", "--dry-run", f"output_dir={tmp_path}")
    assert "export ACCELERATE_USE_CPU=true" in fsdp.stdout  # FSDP2 shards over gloo on a CPU (dsum/distributed.py)


@pytest.mark.parametrize("config", ["fsdp", "fsdp_offload"])
def test_fsdp_configs_are_accepted_by_name(tmp_path, config):
    done = dsum("submit", RECIPE, "--nodes", "2", "--gpus-per-node", "8", "--accelerate", config, "--dry-run",
                f"output_dir={tmp_path}")
    assert done.returncode == 0, done.stderr
    assert f"export DSUM_ACCELERATE_CONFIG={ROOT}/accelerate_configs/{config}.yaml" in done.stdout
    assert "2 node(s) x 8 process(es) = 16 processes" in done.stdout


def test_eval_jobs_render_from_eval_slurm(tmp_path):
    done = dsum("submit", RECIPE, "--job", "eval", "--checkpoint", str(tmp_path / "final"), "--nodes", "1",
                "--gpus-per-node", "2", "--dry-run", f"output_dir={tmp_path}")
    assert done.returncode == 0, done.stderr
    assert "--job-name=dsum-eval" in sbatch_lines(done.stdout)
    assert f"set -- {tmp_path}/slurm/eval.recipe.yaml --checkpoint {tmp_path}/final" in done.stdout
    assert 'dsum_launch eval "$@" --skip-finished' in done.stdout


@pytest.mark.parametrize(("args", "message"), [
    (["--nodes", "0", "--gpus-per-node", "8"], "--nodes 0: expected at least 1"),
    (["--nodes", "1", "--gpus-per-node", "-1"], "--gpus-per-node -1: expected 0 (CPU) or more"),
    (["--nodes", "1", "--gpus-per-node", "8", "--time", "soon"], "--time soon: expected HH:MM:SS"),
    (["--nodes", "1", "--gpus-per-node", "8", "--accelerate", "zero9"], "--accelerate zero9: no such config; expected one of"),
    (["--nodes", "1", "--gpus-per-node", "8", "--env-file", "/nonexistent/env.sh"], "--env-file /nonexistent/env.sh: no such file"),
    (["--nodes", "1", "--gpus-per-node", "8", "--checkpoint", "x"], "--checkpoint: only for --job eval"),
])
def test_bad_options_are_refused_in_one_line(tmp_path, args, message):
    done = dsum("submit", RECIPE, *args, f"output_dir={tmp_path}")
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and message in done.stderr, done.stderr


def test_without_sbatch_on_path_nothing_is_written(tmp_path):
    out = tmp_path / "run"
    done = dsum("submit", RECIPE, "--nodes", "1", "--gpus-per-node", "1", f"output_dir={out}",
                env={"PATH": os.path.dirname(sys.executable)})
    assert done.returncode == 2
    assert done.stderr == ("dsum: error: sbatch is not on PATH: submit from a SLURM login node, or pass --dry-run "
                           "to print the script\n")
    assert not out.exists()


def test_the_frozen_recipe_loads_back_as_the_same_recipe(tmp_path):
    import yaml

    from dsum.config import load_recipe
    from dsum.submit import frozen

    for path in (RECIPE, ROOT / "recipes" / "tiny" / "t5-qlora.yaml", ROOT / "recipes" / "llama-2-7b" / "qlora.yaml"):
        recipe = load_recipe(path, ["train.learning_rate=0.003", f"output_dir={tmp_path}"])
        saved = tmp_path / "recipe.yaml"
        saved.write_text(yaml.safe_dump(frozen(recipe), sort_keys=False))
        assert load_recipe(saved) == recipe


def test_a_dry_run_says_it_wrote_nothing_and_how_to_submit(tmp_path):
    out = tmp_path / "run"
    done = dsum("submit", RECIPE, "--nodes", "1", "--gpus-per-node", "0", "--procs-per-node", "2", "--dry-run",
                f"output_dir={out}")
    assert done.returncode == 0, done.stderr
    header = "\n".join(done.stdout.splitlines()[:5])
    assert "nothing was written or submitted" in header and "without --dry-run" in header
    assert "sbatch " not in header, "the script it names was not written, so it cannot be submitted again"
    assert f"reads its recipe from {out}/slurm/train.recipe.yaml, which only a real submit writes" in header
    assert done.stderr == (f"dsum: dry run: nothing was written or submitted; run the same command without --dry-run "
                           f"to write {out}/slurm/train.sbatch and train.recipe.yaml beside it, and submit\n")
    assert not out.exists()


def test_a_real_submit_writes_the_script_and_recipe_its_header_names(tmp_path):
    """With an sbatch that only prints a job id: the script says how to submit it again, and both files exist."""
    bin_dir, out = tmp_path / "bin", tmp_path / "run"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text("#!/bin/sh\necho 4242\n")
    (bin_dir / "sbatch").chmod(0o755)
    done = dsum("submit", RECIPE, "--nodes", "1", "--gpus-per-node", "0", "--procs-per-node", "2",
                f"output_dir={out}", env={"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"})
    assert done.returncode == 0, done.stderr
    assert "submitted job 4242" in done.stdout
    script = (out / "slurm" / "train.sbatch").read_text()
    assert f"# Submit it again with: sbatch {out}/slurm/train.sbatch" in script
    assert "--dry-run" not in script.split("#SBATCH")[0]
    assert (out / "slurm" / "train.recipe.yaml").is_file()
