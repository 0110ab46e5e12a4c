"""Evaluation of a model on a recipe's `eval.split`: generate, score, write `predictions.jsonl` and `metrics.json`.

    dsum eval RECIPE [key.sub=value ...] [--checkpoint DIR] [--base NAME_OR_DIR] [--output-dir DIR] [--overwrite]
    accelerate launch --config_file accelerate_configs/ddp.yaml --num_processes 8 -m dsum eval RECIPE --checkpoint DIR
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from dsum import cpu_speed, distributed, run_dir
from dsum.config import Recipe, RecipeError, recipe_to_dict
from dsum.console import evaluation_summary
from dsum.data import load_split
from dsum.generate import PARTIAL_DIR, generate_predictions
from dsum.preemption import StopSignals, Stopped
from dsum.prompts import pick_shots
from dsum.run_info import RunInfo
from dsum.scoring import ROUGE_KEYS, rouge_from_matrix, rouge_table, spread_score_matrix
from dsum.trained import Checkpoint, check_merge, evaluation_dir, load_for_eval, read_checkpoint

PREDICTIONS_FILE = "predictions.jsonl"
METRICS_FILE = "metrics.json"
IDENTITY_FILE = "evaluation.json"  # in partial/: what its predictions were made with
# Settings that change how fast predictions come, not what they are: a resumed evaluation may change them.
SPEED_ONLY = ("batch_size", "encoder_batch_size", "cache", "compile", "after_training", "validation_samples")


def evaluate(recipe: Recipe, *, model, tokenizer, output_dir: Path, accelerator, model_source: str,
             stop: StopSignals | None = None) -> dict | None:
    """Every rank generates and scores its share; rank 0 writes the files and returns the metrics.
    `model_source` names the model (a checkpoint, or the base for zero-shot) in metrics.json.

    Scoring is spread like generation: each rank scores every world_size-th prediction with ROUGE, the
    per-dialogue scores are gathered back into dataset order, and rank 0 alone averages them and draws the
    bootstrap intervals, so the metrics are the same with any number of processes. `scoring_seconds` is the time
    from the start of the spread scoring to the finished metrics.
    """
    identity = evaluation_identity(recipe, model_source)
    claim_partial(output_dir, identity)
    examples = load_split(recipe.data, recipe.eval.split)[: recipe.eval.max_samples]
    partial = output_dir / PARTIAL_DIR
    shots = (pick_shots(load_split(recipe.data, recipe.data.train_split), recipe.prompt.shots, recipe.train.seed)
             if recipe.prompt.shots else [])
    if distributed.is_main():
        print(evaluation_summary(recipe.eval, model_source, len(examples), distributed.world_size()), flush=True)
    started = time.perf_counter()
    predictions = generate_predictions(recipe, model, tokenizer, examples, accelerator.device,
                                       synced_gpus=distributed.synced_gpus(accelerator, model), autocast=accelerator.autocast,
                                       partial_dir=partial, progress=True, shots=shots, stop=stop)
    seconds = time.perf_counter() - started
    scoring_started = time.perf_counter()
    matrix = spread_score_matrix(predictions)
    if not distributed.is_main():
        distributed.barrier()
        return None
    generated = sum(p.generated_tokens for p in predictions)
    metrics = {
        **rouge_from_matrix(matrix),
        "scoring_seconds": time.perf_counter() - scoring_started,
        "split": recipe.eval.split,
        "mean_generated_tokens": generated / max(len(predictions), 1),
        "generation_seconds": seconds,
        "dialogues_per_second": len(predictions) / seconds,
        "generated_tokens_per_second": generated / seconds,
        "world_size": distributed.world_size(),
        "shots": recipe.prompt.shots,
        "model": model_source,
    }
    output_dir.mkdir(parents=True, exist_ok=True)
    with (output_dir / PREDICTIONS_FILE).open("w", encoding="utf-8") as f:
        for p in predictions:
            f.write(json.dumps(p.as_dict(), ensure_ascii=False) + "\n")
    (output_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    shutil.rmtree(partial, ignore_errors=True)
    title = f"ROUGE F1 on {metrics['split']} (n={metrics['n']}; mean over references, then dialogues)"
    print(rouge_table(metrics, title), flush=True)
    print(f"evaluation written to {output_dir}: {METRICS_FILE}, {PREDICTIONS_FILE}", flush=True)
    distributed.barrier()
    return metrics


def evaluation_identity(recipe: Recipe, model_source: str) -> dict:
    """What the predictions depend on: the model, and the recipe's model, tokenizer, data, prompt and
    generation settings."""
    settings = recipe_to_dict(recipe)
    return {"model": model_source, "recipe": {
        **{section: settings[section] for section in ("model", "tokenizer", "data", "prompt")},
        "eval": {key: value for key, value in settings["eval"].items() if key not in SPEED_ONLY}}}


def check_partial(output_dir: Path, identity: dict) -> None:
    """Resume only the evaluation that was interrupted: predictions left in `partial/` by another model,
    or with other settings, are refused, never mixed in."""
    partial = output_dir / PARTIAL_DIR
    earlier = read_identity(partial)
    if earlier == identity or not any(partial.glob("rank-*.jsonl")):
        return
    if earlier is None:
        what = "of unknown origin"
    elif earlier["model"] != identity["model"]:
        what = f"of another model ({earlier['model']})"
    else:
        keys = sorted(f"{section}.{key}" for section, values in identity["recipe"].items()
                      for key in values if earlier["recipe"].get(section, {}).get(key) != values[key])
        what = f"made with other settings ({', '.join(keys)})"
    raise RecipeError(f"{partial} holds the predictions of an unfinished evaluation {what}; pass --overwrite "
                      "to start afresh, or --output-dir to write elsewhere")


def claim_partial(output_dir: Path, identity: dict) -> None:
    """`check_partial`, then mark `partial/` as this evaluation's."""
    check_partial(output_dir, identity)
    partial = output_dir / PARTIAL_DIR
    distributed.barrier()  # every rank has looked before the mark is written
    if distributed.is_main() and read_identity(partial) != identity:  # nothing generated yet, or ours already
        partial.mkdir(parents=True, exist_ok=True)
        (partial / IDENTITY_FILE).write_text(json.dumps(identity, indent=2) + "\n")
    distributed.barrier()


def read_identity(partial: Path) -> dict | None:
    marker = partial / IDENTITY_FILE
    return json.loads(marker.read_text()) if marker.is_file() else None


def validation_rouge(recipe: Recipe, model, tokenizer, examples: list, accelerator) -> dict[str, float]:
    """ROUGE of the model on validation examples, generated and scored as an evaluation does, for the
    training loop's validation: `validation_rouge1`, ... on rank 0, nothing on the others."""
    predictions = generate_predictions(recipe, model, tokenizer, examples, accelerator.device,
                                       synced_gpus=distributed.synced_gpus(accelerator, model), autocast=accelerator.autocast)
    matrix = spread_score_matrix(predictions)
    if not distributed.is_main():  # the others' records are never written
        return {}
    scores = rouge_from_matrix(matrix)
    return {f"validation_{key}": scores[key] for key in ROUGE_KEYS}


def run_eval(recipe: Recipe, *, checkpoint: Path | None, output_dir: Path | None, overwrite: bool,
             skip_finished: bool = False, base: str | None = None) -> dict | None:
    """`dsum eval`: load the model the arguments name, then evaluate it.

    The model is any checkpoint given with `--checkpoint` (a run, its `final/` or one of its
    `checkpoints/step-N`: full weights, or an adapter loaded onto its base, `base` where given), or the
    recipe's base model alone (zero-shot).

    SIGUSR1 or SIGTERM, from the start: stop after the current batch, keeping what is generated.
    """
    from accelerate import Accelerator

    from dsum.modeling import warn_of_remote_code

    if base is not None and checkpoint is None:
        raise RecipeError("--base: it names the base of --checkpoint's adapter; to evaluate a base model alone, "
                          "set model.name_or_path")
    warn_of_remote_code(recipe)
    # Everything the checkpoint's loading will read, checked before anything is written.
    trained = read_checkpoint(checkpoint, base=base, recipe=recipe) if checkpoint is not None else None
    if trained is not None:
        check_merge(recipe, trained)
    output_dir = output_dir or evaluation_dir(recipe, trained)
    if (output_dir / METRICS_FILE).is_file() and not overwrite:
        if skip_finished:
            if distributed.is_main():
                print(f"{output_dir} already holds a finished evaluation; nothing to do", flush=True)
            return None
        raise RecipeError(f"{output_dir} already holds a finished evaluation; pass --overwrite to replace it, "
                          "or --output-dir to write elsewhere")
    accelerator = Accelerator(mixed_precision=recipe.train.mixed_precision,
                              kwargs_handlers=distributed.process_group_kwargs())
    cpu_speed.start_run(accelerator.device)
    if overwrite and distributed.is_main():
        (output_dir / METRICS_FILE).unlink(missing_ok=True)
        shutil.rmtree(output_dir / PARTIAL_DIR, ignore_errors=True)
    distributed.barrier()
    source = model_source(recipe, trained)
    check_partial(output_dir, evaluation_identity(recipe, source))  # before the model is loaded: fail fast
    with StopSignals() as stop:
        model, tokenizer = load_for_eval(recipe, trained)
        model = prepare_for_inference(accelerator, model, recipe)
        return evaluate(recipe, model=accelerator.unwrap_model(model), tokenizer=tokenizer, output_dir=output_dir,
                        accelerator=accelerator, model_source=source, stop=stop)


def evaluate_run(recipe: Recipe, output_dir: Path) -> None:
    """The end of `dsum train`, after `train()` saved `final/`: with `eval.after_training`, `final/` is
    evaluated into `eval/` as `dsum eval` would (the predictions a stopped evaluation left are kept), then the
    run is finished. A stop or an error here is written to run.json, and leaves the evaluation alone to do."""
    with run_dir.claim(output_dir, resuming=True, overwrite=False), RunInfo.existing(output_dir) as run:
        if recipe.eval.after_training:
            try:
                run_eval(recipe, checkpoint=output_dir / run_dir.FINAL, output_dir=output_dir / run_dir.EVAL_DIR,
                         overwrite=False, skip_finished=True)
            except Stopped as stopped:
                run.update(status="stopped", stopped_by=stopped.by, stopped_in="evaluation")
                raise
        run.finish()
    distributed.barrier()


def model_source(recipe: Recipe, checkpoint: Checkpoint | None) -> str:
    """The evaluated model as metrics.json names it: the checkpoint, or the base alone (zero-shot)."""
    if checkpoint is not None:
        return str(checkpoint.path.resolve())
    return recipe.model.name_or_path or str((Path(recipe.output_dir) / run_dir.BASE_DIR).resolve())


def prepare_for_inference(accelerator, model, recipe: Recipe):
    """On the device; under DeepSpeed, in an engine (ZeRO-3 shards the weights across ranks)."""
    if accelerator.state.deepspeed_plugin is None:
        return model.to(accelerator.device)
    distributed.configure_deepspeed(accelerator, recipe.eval.batch_size)
    return accelerator.prepare(model)
