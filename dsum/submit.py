"""`dsum submit`: render a SLURM batch script from a recipe and an Accelerate config, and submit it.

    dsum submit RECIPE --nodes 2 --gpus-per-node 8 --accelerate multi_node_zero3 --time 24:00:00
    dsum submit RECIPE --job eval --checkpoint runs/x/final --nodes 1 --gpus-per-node 8 --dry-run
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from dsum.config import Recipe, RecipeError, check_deepspeed, check_fsdp, read_yaml
from dsum.run_dir import RUN_FILE, SLURM_DIR, read_status

ROOT = Path(__file__).resolve().parent.parent
LAUNCH_DIR = ROOT / "launch"
CONFIG_DIR = ROOT / "accelerate_configs"
TIME_FORMAT = re.compile(r"^(\d+-)?\d{1,2}(:\d{2}){0,2}$")  # sbatch's MM, MM:SS, HH:MM:SS, D-HH[:MM[:SS]]


@dataclass
class SubmitOptions:
    nodes: int
    gpus_per_node: int
    job: str = "train"
    procs_per_node: int | None = None
    accelerate: str | None = None
    time: str | None = None
    partition: str | None = None
    account: str | None = None
    signal_seconds: int = 300
    port: int = 29500
    env_file: Path | None = None
    checkpoint: Path | None = None
    sbatch_options: list[str] = field(default_factory=list)


def submit(recipe: Recipe, options: SubmitOptions, *, dry_run: bool) -> str | None:
    """Print the script (dry run) or write it and submit it; returns the job id.

    The script is `launch/train.slurm` (or `eval.slurm`) with its `#SBATCH` block rendered from the options and
    `launch/common.sh` inlined, so the file is whole: `sbatch` it again to rerun the job. The recipe, overrides
    applied, is frozen next to it (`train.recipe.yaml`), so editing the recipe later does not change a job that
    requeues. Both go into `<output_dir>/slurm/`, with the job's logs.
    """
    check_options(options)
    check_script_text({"output_dir": recipe.output_dir, "the working directory": str(Path.cwd())})
    config = accelerate_config(options)
    check_recipe_fits(recipe, config)
    output_dir = Path(recipe.output_dir).resolve()
    if options.job == "train" and read_status(output_dir / RUN_FILE) == "finished":
        raise RecipeError(f"output_dir {output_dir} already holds a finished run; choose another output_dir")
    slurm_dir = output_dir / SLURM_DIR
    script = render(recipe, options, config, slurm_dir, dry_run=dry_run)
    if dry_run:  # the script on stdout, to read or save; what was not done on stderr
        print(script, end="")
        print(f"dsum: dry run: nothing was written or submitted; run the same command without --dry-run to write "
              f"{slurm_dir / f'{options.job}.sbatch'} and {options.job}.recipe.yaml beside it, and submit",
              file=sys.stderr)
        return None
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise RecipeError("sbatch is not on PATH: submit from a SLURM login node, or pass --dry-run to print the script")
    slurm_dir.mkdir(parents=True, exist_ok=True)
    (slurm_dir / f"{options.job}.recipe.yaml").write_text(yaml.safe_dump(frozen(recipe), sort_keys=False))
    path = slurm_dir / f"{options.job}.sbatch"
    path.write_text(script)
    done = subprocess.run([sbatch, "--parsable", str(path)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RecipeError(f"sbatch refused {path}: {done.stderr.strip() or done.stdout.strip()}")
    job_id = done.stdout.strip().split(";")[0]
    print(f"submitted job {job_id}: {options.nodes} node(s) x {processes_per_node(options)} process(es)\n"
          f"  script: {path}\n  log:    {slurm_dir / f'dsum-{options.job}-{job_id}.out'}\n"
          f"  ranks:  {slurm_dir / f'job-{job_id}-run-0'}/ (one directory per requeue)")
    return job_id


def frozen(recipe: Recipe) -> dict:
    """The recipe as given, overrides applied: every value that was set, and no default written out."""
    return recipe.model_dump(mode="json", exclude_unset=True)


def check_options(o: SubmitOptions) -> None:
    if o.job not in ("train", "eval"):
        raise RecipeError(f"--job {o.job}: expected train or eval")
    if o.nodes < 1:
        raise RecipeError(f"--nodes {o.nodes}: expected at least 1")
    if o.gpus_per_node < 0:
        raise RecipeError(f"--gpus-per-node {o.gpus_per_node}: expected 0 (CPU) or more")
    if o.procs_per_node is not None and o.procs_per_node < 1:
        raise RecipeError(f"--procs-per-node {o.procs_per_node}: expected at least 1")
    if o.time is not None and not TIME_FORMAT.match(o.time):
        raise RecipeError(f"--time {o.time}: expected HH:MM:SS or D-HH:MM:SS")
    if o.signal_seconds < 0:
        raise RecipeError(f"--signal-seconds {o.signal_seconds}: expected 0 or more")
    if not 1024 <= o.port <= 65535:
        raise RecipeError(f"--port {o.port}: expected a port from 1024 to 65535")
    if o.env_file is not None and not o.env_file.is_file():
        raise RecipeError(f"--env-file {o.env_file}: no such file")
    if o.checkpoint is not None and o.job != "eval":
        raise RecipeError("--checkpoint: only for --job eval")
    check_script_text({"--partition": o.partition, "--account": o.account, "--accelerate": o.accelerate,
                       "--env-file": o.env_file, "--checkpoint": o.checkpoint,
                       **{f"--sbatch {option!r}": option for option in o.sbatch_options}})


CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def check_script_text(values: dict[str, object]) -> None:
    """Every value that reaches the batch script is quoted there, but a line break would still end the
    `#SBATCH` line or comment it sits in and start a command: control characters are refused."""
    for name, value in values.items():
        if value is not None and CONTROL.search(str(value)):
            raise RecipeError(f"{name}: holds a control character ({CONTROL.search(str(value)).group()!r}), which "
                              "would break the batch script's lines; give it without")


@dataclass(frozen=True)
class AccelerateConfig:
    path: Path
    settings: dict

    @property
    def deepspeed(self) -> bool:
        return self.settings.get("distributed_type") == "DEEPSPEED"

    @property
    def fsdp(self) -> bool:
        return self.settings.get("distributed_type") == "FSDP"


def accelerate_config(o: SubmitOptions) -> AccelerateConfig:
    """`--accelerate NAME` is accelerate_configs/NAME.yaml; a path is taken as it is."""
    name = o.accelerate or ("ddp" if o.nodes == 1 else "multi_node_ddp")
    path = Path(name)
    if not path.suffix:
        path = CONFIG_DIR / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
        raise RecipeError(f"--accelerate {name}: no such config; expected one of {known}, or a path to a YAML file")
    return AccelerateConfig(path.resolve(), read_yaml(path, "--accelerate") or {})


def check_recipe_fits(recipe: Recipe, config: AccelerateConfig) -> None:
    """What training would refuse at start-up under this config, refused before the job waits in a queue."""
    if config.deepspeed:
        check_deepspeed(recipe, int(config.settings.get("deepspeed_config", {}).get("zero_stage", 0)))
    if config.fsdp:  # Accelerate's default version is 1
        check_fsdp(recipe, int(config.settings.get("fsdp_config", {}).get("fsdp_version", 1)))


def processes_per_node(o: SubmitOptions) -> int:
    return o.procs_per_node or o.gpus_per_node or 1


def render(recipe: Recipe, o: SubmitOptions, config: AccelerateConfig, slurm_dir: Path, *,
           dry_run: bool = False) -> str:
    """The batch script: the `#SBATCH` block from the options, the settings, then the launch script's body.
    A dry run's script says that it was only printed: the files it names are written by a real submit."""
    name = f"dsum-{o.job}"
    directives = [f"--job-name={name}", f"--nodes={o.nodes}", "--ntasks-per-node=1"]
    if o.gpus_per_node:
        directives.append(f"--gpus-per-node={o.gpus_per_node}")
    directives += [f"--{key}={value}" for key, value in (("time", o.time), ("partition", o.partition),
                                                          ("account", o.account)) if value]
    directives += ["--requeue", f"--signal=B:USR1@{o.signal_seconds}", "--open-mode=append",
                   f"--output={slurm_dir}/%x-%j.out", f"--chdir={Path.cwd()}", *o.sbatch_options]
    settings = {"DSUM_ACCELERATE_CONFIG": config.path, "DSUM_PORT": o.port, "DSUM_LOG_DIR": slurm_dir}
    if o.procs_per_node or not o.gpus_per_node:
        settings["DSUM_PROCS_PER_NODE"] = processes_per_node(o)
    if not o.gpus_per_node and not config.deepspeed:
        settings["ACCELERATE_USE_CPU"] = "true"  # DDP over gloo; DeepSpeed picks the CPU by itself
    if o.env_file is not None:
        settings["DSUM_ENV_FILE"] = o.env_file.resolve()
    script_path, recipe_path = slurm_dir / f"{o.job}.sbatch", slurm_dir / f"{o.job}.recipe.yaml"
    args = [str(recipe_path)]
    if o.checkpoint is not None:
        args += ["--checkpoint", str(o.checkpoint.resolve())]
    body = launch_body(o.job)
    when = time.strftime("%Y-%m-%d %H:%M:%S")
    if dry_run:
        origin = [f"# Printed by `dsum submit --dry-run` from launch/{o.job}.slurm on {when}: nothing was written or "
                  "submitted.",
                  f"# The job reads its recipe from {recipe_path}, which only a real submit writes:",
                  f"# run the same dsum submit command without --dry-run to write it and this script ({script_path})",
                  "# and submit them."]
    else:
        origin = [f"# Rendered by `dsum submit` from launch/{o.job}.slurm on {when}.",
                  f"# Submit it again with: sbatch {script_path}"]
    return "\n".join([
        "#!/bin/bash",
        *origin,
        f"# {o.nodes} node(s) x {processes_per_node(o)} process(es) = {o.nodes * processes_per_node(o)} "
        f"processes, Accelerate config {config.path.name}",
        *(f"#SBATCH {shlex.quote(d)}" for d in directives),
        "",
        *(f"export {key}={shlex.quote(str(value))}" for key, value in settings.items()),
        f"set -- {' '.join(shlex.quote(a) for a in args)}",
        body,
    ])


def launch_body(job: str) -> str:
    """launch/<job>.slurm after its header, with launch/common.sh inlined where it is sourced."""
    script = LAUNCH_DIR / f"{job}.slurm"
    if not script.is_file():
        raise RecipeError(f"{script}: not found; dsum submit needs the repository's launch/ directory")
    common = (LAUNCH_DIR / "common.sh").read_text()
    lines = script.read_text().splitlines()
    start = max(i for i, line in enumerate(lines) if line.startswith("#SBATCH")) + 1
    body = [common if line.startswith("source ") and "common.sh" in line else line for line in lines[start:]]
    return "\n".join(body).strip("\n") + "\n"
