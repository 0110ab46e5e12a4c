"""`dsum bench --goals`: dsum alone, on the workloads BENCHMARKS.md sets absolute goals for on one GPU,
timed as a user runs them (an epoch from its first step, or the bench's timed steps after its warm-up)."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsum.bench.dsum_way import eval_dsum, timed_window
from dsum.bench.harness import fresh_state, free_memory, phase, workspace
from dsum.bench.inputs import BenchData, base_name, eval_model, save_base
from dsum.bench.options import BenchOptions, check_device, data_directory, select_models
from dsum.bench.recipes import bench_recipe, check_dsum_settings, dsum_speed_settings
from dsum.bench.report import provenance, report, run_fields
from dsum.bench.sizes import ModelSpec, Sizes
from dsum.config import Recipe, RecipeError
from dsum.distributed import tell_deepspeed_the_device
from dsum.profiling import Schedule, StepProfiler, brief


@dataclass(frozen=True)
class Workload:
    """What is timed on one of the device's bench models, and the goals its figures must meet."""

    model: str  # a ModelSpec name of the device (dsum.bench.sizes.MODELS)
    epoch: bool = False  # one epoch of the training examples, first step included; else the bench's timed steps
    sequence_length: int | None = None  # causal: the examples packed end to end in rows of this many tokens
    # Tokens a micro-batch, length-grouped, in place of the bench's (batch size x mean example tokens);
    # "auto": as many as fit the GPU (dsum/sizing.py).
    token_budget: int | str | None = None
    evaluate: bool = False  # also generate for the test dialogues
    # Dialogues per generate call, halved if they do not fit; None: Sizes.dsum_generation's.
    eval_batch_size: int | None = None
    goals: dict[str, tuple[str, float]] = field(default_factory=dict)  # figure: ("<=" or ">=", bound)


# The goals hold on one H100 or H200; the CPU stand-ins have none.
WORKLOADS = {
    "cuda": (
        # The epoch in 20 s: 1,704 micro-batches of the bench's size leave the GPU waiting; as many tokens as fit.
        Workload("flan-t5-base", epoch=True, evaluate=True, eval_batch_size=512,  # all 500 test dialogues at once
                 token_budget="auto",
                 goals={"train_seconds": ("<=", 20.0), "mfu": (">=", 0.25), "eval_seconds": ("<=", 3.0)}),
        Workload("llama-2-7b-qlora", sequence_length=1024,
                 goals={"real_tokens_per_second": (">=", 5000.0), "peak_gpu_reserved_gib": ("<=", 10.0)}),
        Workload("llama-2-7b-lora", sequence_length=1024, goals={"real_tokens_per_second": (">=", 8000.0)}),
    ),
    "cpu": (
        Workload("t5", epoch=True, evaluate=True),
        Workload("llama", sequence_length=1024),
    ),
}


def run_goals(options: BenchOptions) -> dict[str, Any]:
    """Time every chosen workload; print the figures against their goals; write the JSON if asked."""
    started = time.perf_counter()
    if options.notebook_rows is not None:
        raise RecipeError("--notebook-rows: --goals times dsum alone, with no notebook way; leave it out")
    options.check_outputs()
    check_device(options.device)
    tell_deepspeed_the_device()  # before the training imports it
    from dsum import cpu_speed

    cpu_speed.start_run(options.device)  # for every way alike, from the start
    sizes = options.sizes()
    workloads = select_workloads(options.device, options.models)
    specs = {spec.name: spec for spec in select_models(options.device, [w.model for w in workloads], options.recipes)}
    settings = check_dsum_settings(options.dsum_settings(), list(specs.values()), sizes)
    data_dir = data_directory(options.data)
    load_before = os.getloadavg()
    with workspace(options.workdir) as workdir:
        with phase("data and tokenizer") as note:
            data = BenchData.load(data_dir, sizes, workdir / "tokenizer")
            note(f"{len(data.train)} training dialogues, {len(data.test)} test dialogues")
        results = {}
        for workload in workloads:
            results[workload.model] = run_workload(workload, specs[workload.model], sizes, data, options.device,
                                                   workdir, settings, options.profile)
            free_memory()
    summary = {
        "goals_met": overall([goal["met"] for r in results.values() for goal in r["goals"].values()]),
        "workloads": results,
        "data": {"directory": str(data.directory), "train_dialogues": len(data.train),
                 "test_dialogues": len(data.test), "tokenizer_vocab": sizes.vocab_size},
        **run_fields(sizes, options, load_before, started),
    }
    report(format_goals(summary), summary, options.results_path(summary))
    return summary


def select_workloads(device: str, names: tuple[str, ...] | None) -> list[Workload]:
    known = {w.model: w for w in WORKLOADS[device]}
    unknown = [name for name in names or () if name not in known]
    if unknown:
        raise RecipeError(f"--models: {', '.join(unknown)} has no goals run on {device}; choose from "
                          f"{', '.join(known)}")
    return [known[name] for name in dict.fromkeys(names)] if names else list(known.values())


def run_workload(workload: Workload, spec: ModelSpec, sizes: Sizes, data: BenchData, device: str, workdir: Path,
                 settings: dict[str, dict[str, Any]], profile_dir: Path | None = None) -> dict[str, Any]:
    """Train (and generate) one workload; with `profile_dir`, a few steps of its training are profiled:
    those right after the bench's warm-up steps, early in an epoch."""
    from dsum.train import train

    with phase(f"{spec.name}: random-init base") as note:
        base, parameters = save_base(spec, sizes, data, device, workdir / "bases" / base_name(spec))
        note(f"{parameters:,} parameters")
    recipe = workload_recipe(spec, workload, sizes, data, base, workdir / spec.name, settings)
    what = "one epoch" if workload.epoch else f"{sizes.train_steps} steps after {sizes.warmup_steps} of warm-up"
    profile = StepProfiler(profile_dir, f"{spec.name}-goals", device, Schedule.after(
        sizes.warmup_steps, None if workload.epoch else sizes.warmup_steps + sizes.train_steps))
    with phase(f"{spec.name}: train, {what}") as note:
        fresh_state(sizes.seed)
        timed_from = None if workload.epoch else sizes.warmup_steps
        train(recipe, overwrite=True, profile=profile, timed_from_step=timed_from)
        figures = training_figures(workload, recipe, sizes)
        note(f"{figures['real_tokens_per_second']:,.0f} real tokens/s over {figures['train_seconds']:.1f}s")
    free_memory()
    if workload.evaluate:
        from transformers import AutoTokenizer

        with phase(f"{spec.name}: generate for {len(data.test)} test dialogues") as note:
            model = eval_model(recipe, base, sizes, device)
            speed = eval_dsum(recipe, model, AutoTokenizer.from_pretrained(data.tokenizer_dir), data.test, device)
            figures.update(eval_seconds=speed.seconds_timed, eval_dialogues_per_second=speed.dialogues_per_second,
                           eval_mean_new_tokens=speed.mean_new_tokens)
            note(f"{speed.seconds_timed:.2f}s, {speed.dialogues_per_second:.1f} dialogues/s")
            del model
    return {
        "parameters": parameters,
        "architecture": spec.architecture,
        "recipe": spec.recipe_source,
        "adapter": recipe.adapter.method,
        "settings": {"epoch": workload.epoch, "sequence_length": workload.sequence_length,
                     **{key: getattr(recipe.train, key) for key in ("group_by_length", "max_tokens_per_batch", "packing",
                                                                    "fast_cpu_dropout", "compile",
                                                                    "gradient_accumulation_steps", "optimizer",
                                                                    "mixed_precision", "gradient_checkpointing")},
                     **{f"eval_{key}": getattr(recipe.eval, key)
                        for key in ("batch_size", "encoder_batch_size", "cache", "compile", "max_new_tokens")},
                     "eval_dtype": sizes.eval_dtype},
        "figures": figures,
        "goals": {name: judge(figures.get(name), goal) for name, goal in workload.goals.items()},
        "profile": brief(profile.record) if profile.record else None,
    }


def workload_recipe(spec: ModelSpec, workload: Workload, sizes: Sizes, data: BenchData, base: Path,
                    output_dir: Path, settings: dict[str, dict[str, Any]] | None = None) -> Recipe:
    """The spec's recipe as a user runs it (`bench_recipe(as_written=True)`), with dsum's speed settings:
    length-grouped token budgets, or packed rows of `sequence_length`; then `settings` (`--dsum`'s)."""
    paths = {"model_source": {"name_or_path": str(base)}, "tokenizer_dir": data.tokenizer_dir,
             "data_dir": data.directory, "output_dir": output_dir, "as_written": True, "epoch": workload.epoch,
             "eval_batch_size": workload.eval_batch_size}
    if workload.sequence_length is not None:
        speed = {"packing": True, "max_tokens_per_batch": workload.sequence_length, "group_by_length": False}
    elif workload.token_budget is not None:
        speed = {"group_by_length": True, "max_tokens_per_batch": workload.token_budget}
    else:
        from transformers import AutoTokenizer

        from dsum.features import Featurizer

        recipe = bench_recipe(spec, sizes, **paths)
        features = Featurizer(recipe, AutoTokenizer.from_pretrained(data.tokenizer_dir)).training_features(data.train)
        speed = dsum_speed_settings(recipe.model.family, recipe.train.per_device_batch_size, features)
    settings = settings or {}
    return bench_recipe(spec, sizes, **paths, dsum={"train": {**speed, **settings.get("train", {})},
                                                    "eval": settings.get("eval", {})})


def training_figures(workload: Workload, recipe: Recipe, sizes: Sizes) -> dict[str, Any]:
    """From the run's own telemetry: over the whole loop for an epoch (run.json), over the timed steps
    after the warm-up otherwise (run.json's `after_step`, `dsum_way.timed_window`)."""
    output_dir = Path(recipe.output_dir)
    run = json.loads((output_dir / "run.json").read_text())
    telemetry = run["telemetry"]
    figures = {"steps": run["total_steps"], "train_examples": run["num_train_examples"],
               "max_tokens_per_batch": run.get("max_tokens_per_batch"),  # as settled, where the recipe says auto
               "compiled_graphs": telemetry.get("compiled_graphs"),
               "peak_gpu_allocated_gib": telemetry.get("peak_gpu_allocated_gib"),
               "peak_gpu_reserved_gib": telemetry.get("peak_gpu_reserved_gib"),
               "peak_host_rss_gib": telemetry["peak_host_rss_gib"]}
    if workload.epoch:
        return figures | {"train_seconds": telemetry["loop_seconds"],
                          "real_tokens_per_second": telemetry["tokens_per_second"],
                          "padding_efficiency": telemetry["padding_efficiency"],
                          "model_tflops_per_second": telemetry["model_tflops_per_second"], "mfu": telemetry.get("mfu")}
    timed = timed_window(run, sizes)
    return figures | {"train_seconds": timed["seconds"], "real_tokens_per_second": timed["tokens_per_second"],
                      "padding_efficiency": timed["padding_efficiency"],
                      "model_tflops_per_second": timed["model_tflops_per_second"], "mfu": timed.get("mfu")}


def judge(value: float | None, goal: tuple[str, float]) -> dict[str, Any]:
    """A figure against its goal; `met` is None where the figure was not measured (MFU on an unknown GPU)."""
    sign, bound = goal
    if sign not in ("<=", ">="):
        raise ValueError(f"a goal is '<=' or '>=' a bound, not {sign!r}")
    met = None if value is None else (value <= bound if sign == "<=" else value >= bound)
    return {"value": value, "goal": f"{sign} {bound:g}", "met": met}


def overall(verdicts: list[bool | None]) -> bool | None:
    """False if a goal was missed; else None if one was not measured (or there are none); else True."""
    if False in verdicts:
        return False
    return None if not verdicts or None in verdicts else True


FIGURES = {  # name: (label, format)
    "train_seconds": ("train seconds", "{:.1f}"),
    "real_tokens_per_second": ("train real tokens/s", "{:,.0f}"),
    "padding_efficiency": ("train padding efficiency", "{:.2f}"),
    "model_tflops_per_second": ("model TFLOP/s", "{:.2f}"),
    "mfu": ("MFU", "{:.1%}"),
    "peak_gpu_allocated_gib": ("peak GPU allocated, GiB", "{:.2f}"),
    "peak_gpu_reserved_gib": ("peak GPU reserved, GiB", "{:.2f}"),
    "eval_seconds": ("eval seconds", "{:.2f}"),
    "eval_dialogues_per_second": ("eval dialogues/s", "{:.1f}"),
}


def budget_shown(result: dict[str, Any]) -> str:
    """A workload's micro-batch budget: as the run settled it, with "(auto)" where the recipe left it to the run."""
    asked = result["settings"].get("max_tokens_per_batch")
    settled = result["figures"].get("max_tokens_per_batch") or asked
    return f"{settled:,} (auto)" if asked == "auto" and settled != "auto" else str(settled)


def format_goals(summary: dict[str, Any]) -> str:
    lines = []
    for name, result in summary["workloads"].items():
        settings = result["settings"]
        shape = (f"packed rows of {settings['sequence_length']} tokens" if settings["sequence_length"]
                 else f"length-grouped batches of up to {budget_shown(result)} tokens")
        method = "full fine-tuning" if result["adapter"] == "none" else result["adapter"]
        lines += ["", f"{name} ({result['parameters']:,} parameters, {method}; "
                      f"{'one epoch' if settings['epoch'] else 'timed steps'}, {shape})"]
        for figure, (label, form) in FIGURES.items():
            value = result["figures"].get(figure)
            if value is None:
                continue
            goal = result["goals"].get(figure)
            verdict = "" if goal is None else f"  [{goal['goal']}: {'met' if goal['met'] else 'missed'}]"
            lines.append(f"  {label:28}{form.format(value):>12}{verdict}")
        for figure, goal in result["goals"].items():
            if goal["value"] is None:
                lines.append(f"  {FIGURES[figure][0]:28}{'n/a':>12}  [{goal['goal']}: not measured on this device]")
    met = summary["goals_met"]
    lines.append("")
    if summary["dsum_options"]:
        lines.append(f"dsum ran with {' '.join(summary['dsum_options'])} (--dsum) over the workloads' settings")
    lines.append("goals: " + ("none on this device (the goals are for one H100 or H200)" if not any(
        r["goals"] for r in summary["workloads"].values()) else {True: "all met", False: "some missed",
                                                                 None: "not all measured"}[met]))
    gpu = summary["machine"].get("gpu")
    lines += provenance(summary)
    lines.append(f"machine: {gpu or summary['machine']['cpu']}, torch {summary['machine']['torch']}; "
                 f"total wall time: {summary['wall_seconds']:.0f}s")
    return "\n".join(lines)
