"""dsum's own way: `dsum.train.train` on the bench's recipe, timed from what the run writes, and
`dsum.generate.generate_predictions` over the unique test dialogues."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Sequence

from dsum.bench.harness import EvalSpeed, TrainSpeed, synchronize
from dsum.bench.recipes import dsum_own_settings
from dsum.bench.sizes import Sizes
from dsum.config import Recipe
from dsum.profiling import StepProfiler


def train_dsum(recipe: Recipe, sizes: Sizes, profile: StepProfiler | None = None) -> TrainSpeed:
    """dsum's loop, through `dsum.train.train`: the timed window from its metrics.jsonl, the examples it
    trained from from its run.json."""
    from dsum.train import train

    train(recipe, overwrite=True, profile=profile)
    output_dir = Path(recipe.output_dir)
    seconds, real, processed = read_dsum_window(output_dir / "metrics.jsonl", sizes)
    run = json.loads((output_dir / "run.json").read_text())
    return TrainSpeed(sizes.train_steps, seconds, real, processed, run["num_train_examples"],
                      settings=dsum_own_settings(recipe, "train") | {"max_grad_norm": recipe.train.max_grad_norm})


def read_dsum_window(metrics_file: Path, sizes: Sizes) -> tuple[float, int, int]:
    """Seconds, real and processed tokens of the timed steps, from dsum's metrics.jsonl (see window_totals)."""
    seconds, totals = window_totals(metrics_file, sizes, ("tokens_per_second", "processed_tokens_per_second"))
    return seconds, round(totals["tokens_per_second"]), round(totals["processed_tokens_per_second"])


def window_totals(metrics_file: Path, sizes: Sizes, rates: Sequence[str]) -> tuple[float, dict[str, float | None]]:
    """Seconds of the timed window, from the end of the warm-up to the last step, and for each rate logged
    per second its amount over the window: the rate times the span of each record. None for a rate a
    record lacks (MFU where the GPU's peak is not known).

    The same window the other ways time, warm-up excluded, which run.json's telemetry (over the whole
    loop) cannot give. The bench's recipe has the loop log at the end of the warm-up
    (`recipes.window_logging`); each record holds the rates since the one before and the seconds since
    the loop began, read after the device has finished the step (the loss is read back to log it)."""
    records = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    records = [r for r in records if "tokens_per_second" in r]
    start = next((r for r in records if r["step"] == sizes.warmup_steps), None)
    if start is None:
        raise RuntimeError(f"{metrics_file}: no record at step {sizes.warmup_steps}, the end of the warm-up; the "
                           "bench's recipe logs there (recipes.window_logging)")
    totals: dict[str, float | None] = dict.fromkeys(rates, 0.0)
    previous = start
    for record in records:
        if record["step"] <= sizes.warmup_steps:
            continue
        span = record["elapsed_seconds"] - previous["elapsed_seconds"]
        for rate in rates:
            value = record.get(rate)
            totals[rate] = None if value is None or totals[rate] is None else totals[rate] + value * span
        previous = record
    if previous["step"] != sizes.warmup_steps + sizes.train_steps:
        raise RuntimeError(f"dsum logged up to step {previous['step']}, not {sizes.warmup_steps + sizes.train_steps}")
    return previous["elapsed_seconds"] - start["elapsed_seconds"], totals


def eval_dsum(recipe: Recipe, model, tokenizer, examples: Sequence, device: str) -> EvalSpeed:
    """dsum's generator over the unique dialogues, longest first, eval.batch_size at a time: the whole
    pass in every round (a part of it would change how the dialogues fall into batches)."""
    from dsum.generate import generate_predictions

    generate_predictions(recipe, model, tokenizer, examples[:1], device)  # warm-up
    synchronize(device)
    started = time.perf_counter()
    predictions = generate_predictions(recipe, model, tokenizer, examples, device)
    synchronize(device)
    seconds = time.perf_counter() - started
    return EvalSpeed(len(examples), len(examples), len(examples), recipe.eval.batch_size, seconds,
                     sum(p.generated_tokens for p in predictions) / len(predictions))
