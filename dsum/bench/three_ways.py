"""`dsum bench`: on each model, the same weights, data and machine, three ways train and then generate
summaries (notebook, no_trainer, dsum), timed in rounds that take them in turn."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Sequence

from dsum.bench.dsum_way import eval_dsum, train_dsum
from dsum.bench.harness import (EvalSpeed, TrainSpeed, collections_skip_what_lives_now, free_memory, in_rounds, phase,
                                workspace)
from dsum.bench.inputs import BenchData, base_name, eval_model, save_base
from dsum.bench.no_trainer import eval_no_trainer, train_no_trainer
from dsum.bench.notebook import eval_notebook, train_notebook
from dsum.bench.options import BenchOptions, check_device, data_directory, select_models
from dsum.bench.peers import flattened_rows
from dsum.bench.recipes import bench_recipe, check_dsum_settings, dsum_own_settings, dsum_speed_settings
from dsum.bench.report import format_table, report, summarize
from dsum.bench.sizes import WAYS, ModelSpec, Sizes, eval_rounds, train_rounds
from dsum.distributed import tell_deepspeed_the_device
from dsum.profiling import Schedule, StepProfiler, brief


def run_bench(options: BenchOptions) -> dict[str, Any]:
    """Bench every chosen model; print one line per phase and the table; write the JSON if asked."""
    started = time.perf_counter()
    options.check_outputs()
    check_device(options.device)
    tell_deepspeed_the_device()  # before a way imports it
    from dsum import cpu_speed

    cpu_speed.start_run(options.device)  # for every way alike, from the start
    sizes = options.sizes()
    specs = select_models(options.device, options.models, options.recipes)
    settings = check_dsum_settings(options.dsum_settings(), specs, sizes)
    data_dir = data_directory(options.data)
    load_before = os.getloadavg()
    if options.device == "cpu" and load_before[0] >= 1.0:
        print(f"bench: warning: the load average is {load_before[0]:.1f} on {os.cpu_count()} cores: other work is "
              "running, and it distorts CPU timings (see cpu share below)", flush=True)
    with workspace(options.workdir) as workdir, collections_skip_what_lives_now():
        with phase("data and tokenizer") as note:
            data = BenchData.load(data_dir, sizes, workdir / "tokenizer")
            note(f"{len(data.train)} training dialogues of {data.train_split_size}, {len(data.test)} test dialogues; "
                 f"mean dialogue {data.mean_dialogue_tokens:.0f} tokens, summary {data.mean_summary_tokens:.0f}")
        models = {}
        for spec in specs:
            models[spec.name] = bench_model(spec, sizes, data, options.device, workdir / spec.name, settings,
                                            options.profile)
            free_memory()  # the model's weights go before the next model's arrive
    results = summarize(models, sizes, data, options, load_before, started)
    report(format_table(results), results, options.results_path(results))
    return results


def bench_model(spec: ModelSpec, sizes: Sizes, data: BenchData, device: str, workdir: Path,
                settings: dict[str, dict[str, Any]], profile_dir: Path | None = None) -> dict[str, Any]:
    """The three ways on one model; `settings` are `--dsum`'s, over dsum's speed settings; with
    `profile_dir`, each way's first training round is profiled (`WayProfilers`)."""
    from transformers import AutoTokenizer

    from dsum.features import Featurizer

    with phase(f"{spec.name}: random-init base") as note:
        base, parameters = save_base(spec, sizes, data, device, workdir.parent / "bases" / base_name(spec))
        note(f"{parameters:,} parameters")
    paths = {"model_source": {"name_or_path": str(base)}, "tokenizer_dir": data.tokenizer_dir,
             "data_dir": data.directory, "output_dir": workdir / "dsum"}
    recipe = bench_recipe(spec, sizes, **paths)
    tokenizer = AutoTokenizer.from_pretrained(data.tokenizer_dir)
    features = Featurizer(recipe, tokenizer).training_features(data.train)
    speed = dsum_speed_settings(recipe.model.family, recipe.train.per_device_batch_size, features)
    dsum = {"train": {**speed, **settings["train"]}, "eval": settings["eval"]}
    dsum_recipe = bench_recipe(spec, sizes, **paths, dsum=dsum)

    parts = train_rounds(sizes)
    profiled = WayProfilers(profile_dir, spec.name, device, parts)
    trainers = {  # each takes its round's sizes: the steps it times and its seed
        "notebook": lambda part: train_notebook(recipe, base, tokenizer, features, part, device, workdir,
                                                profiled("notebook", part)),
        "no_trainer": lambda part: train_no_trainer(recipe, base, tokenizer, features, part, device,
                                                    profiled("no_trainer", part)),
        "dsum": lambda part: train_dsum(bench_recipe(spec, part, **paths, dsum=dsum), part, profiled("dsum", part)),
    }
    trained = in_rounds(f"{spec.name}: train", trainers, parts, [part.seed for part in parts], device,
                        TrainSpeed.combined)
    with phase(f"{spec.name}: model for generation"):
        model = eval_model(recipe, base, sizes, device)
    rounds = eval_rounds(sizes, len(flattened_rows(data.test)))
    generators = {  # each takes its round's number
        "notebook": lambda part: eval_notebook(recipe, model, tokenizer, data.test, sizes, device, part, rounds),
        "no_trainer": lambda part: eval_no_trainer(recipe, model, tokenizer, data.test, sizes, device, part, rounds),
        "dsum": lambda part: eval_dsum(dsum_recipe, model, tokenizer, data.test, device),
    }
    evaluated = in_rounds(f"{spec.name}: eval", generators, range(rounds), [sizes.seed] * rounds, device,
                          EvalSpeed.combined)
    return {
        "family": recipe.model.family,
        "parameters": parameters,
        "architecture": spec.architecture,
        "recipe": spec.recipe_source,
        "adapter": recipe.adapter.method,
        "batch_size": recipe.train.per_device_batch_size,
        "gradient_accumulation_steps": recipe.train.gradient_accumulation_steps,
        "learning_rate": recipe.train.learning_rate,
        "precision": {"weights": recipe.model.dtype, "mixed_precision": recipe.train.mixed_precision,
                      "generation": sizes.eval_dtype},
        "dsum_settings": dsum_own_settings(dsum_recipe, "train"),
        "dsum_eval_settings": dsum_own_settings(dsum_recipe, "eval"),
        "train": {way: result.as_dict() for way, result in trained.items()},
        "eval": {way: result.as_dict() for way, result in evaluated.items()},
        "profile": profiled.briefs() if profile_dir is not None else None,
    }


class WayProfilers:
    """Each way's StepProfiler: its first training round's, over a few of its timed steps (the later
    rounds run unprofiled: a profile of one round says where the time goes, and the others time the
    way without the profiler's cost)."""

    def __init__(self, directory: Path | None, model: str, device: str, parts: Sequence[Sizes]):
        first = parts[0]
        schedule = Schedule.after(first.warmup_steps, first.warmup_steps + first.train_steps)
        self.first = first
        self.by_way = {way: StepProfiler(directory, f"{model}-{way}", device, schedule) for way in WAYS}

    def __call__(self, way: str, part: Sizes) -> StepProfiler:
        return self.by_way[way] if part == self.first else StepProfiler.off()

    def briefs(self) -> dict[str, Any]:
        """What the results JSON keeps of each way's profile (the files hold the rest)."""
        return {way: brief(p.record) if p.record else None for way, p in self.by_way.items()}
