"""dsum's own way: `dsum.train.train` on the bench's recipe, timed by its own telemetry, and
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
    """dsum's loop, through `dsum.train.train`, timed by its own telemetry over the steps after the warm-up
    (run.json's `after_step`); the examples it trained from from run.json too."""
    from dsum.train import train

    train(recipe, overwrite=True, profile=profile, timed_from_step=sizes.warmup_steps)
    run = json.loads((Path(recipe.output_dir) / "run.json").read_text())
    timed = timed_window(run, sizes)
    return TrainSpeed(sizes.train_steps, timed["seconds"], round(timed["real_tokens"]),
                      round(timed["processed_tokens"]), run["num_train_examples"],
                      settings=dsum_own_settings(recipe, "train") | {"max_grad_norm": recipe.train.max_grad_norm})


def timed_window(run: dict, sizes: Sizes) -> dict[str, float]:
    """run.json's telemetry over the steps after the warm-up (`train(timed_from_step=...)`), checked to be
    the bench's timed steps: the window the other ways time, from the end of the warm-up to the last step,
    after the device has finished each."""
    timed = run["telemetry"].get("after_step")
    if timed is None or (timed["from_step"], timed["steps"]) != (sizes.warmup_steps, sizes.train_steps):
        got = "none" if timed is None else f"{timed['steps']} steps after step {timed['from_step']}"
        raise RuntimeError(f"dsum's telemetry timed {got}, not the bench's {sizes.train_steps} steps after "
                           f"{sizes.warmup_steps} of warm-up")
    return timed


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
