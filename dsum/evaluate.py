"""Evaluation of a model on a recipe's `eval.split`: generate, score, write `predictions.jsonl` and `metrics.json`.

    dsum eval RECIPE [key.sub=value ...] [--checkpoint DIR] [--output-dir DIR] [--overwrite]
    accelerate launch --config_file accelerate_configs/ddp.yaml --num_processes 8 -m dsum eval RECIPE --checkpoint DIR

The model is a trained run's `final/` (full weights, or a LoRA adapter loaded onto its base), any
such directory given with `--checkpoint`, or the recipe's base model alone (zero-shot).

Scoring is spread like generation: each rank scores every world_size-th prediction with ROUGE, the
per-dialogue scores are gathered back into dataset order, and rank 0 alone averages them and draws
the bootstrap intervals, so the metrics are the same with any number of processes.
`scoring_seconds` is the time from the start of the spread scoring to the finished metrics.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from dsum import cpu_speed, distributed
from dsum.config import EvalConfig, Recipe, RecipeError, recipe_to_dict
from dsum.data import load_split
from dsum.generate import PARTIAL_DIR, Prediction, generate_predictions
from dsum.preemption import StopSignals
from dsum.prompts import pick_shots
from dsum.run_dir import BASE_DIR
from dsum.scoring import interleave, rouge_from_matrix, rouge_table, spread_scores

PREDICTIONS_FILE = "predictions.jsonl"
METRICS_FILE = "metrics.json"
IDENTITY_FILE = "evaluation.json"  # in partial/: what its predictions were made with
# Settings that change how fast predictions come, not what they are: a resumed evaluation may change them.
SPEED_ONLY = ("batch_size", "encoder_batch_size", "cache", "compile", "after_training", "validation_samples")


def evaluate(recipe: Recipe, *, model, tokenizer, output_dir: Path, accelerator, model_source: str,
             stop: StopSignals | None = None) -> dict | None:
    """Every rank generates and scores its share; rank 0 writes the files and returns the metrics.
    `model_source` names the model (a checkpoint, or the base for zero-shot) in metrics.json."""
    identity = evaluation_identity(recipe, model_source)
    claim_partial(output_dir, identity)
    examples = load_split(recipe.data, recipe.eval.split)[: recipe.eval.max_samples]
    partial = output_dir / PARTIAL_DIR
    shots = (pick_shots(load_split(recipe.data, recipe.data.train_split), recipe.prompt.shots, recipe.train.seed)
             if recipe.prompt.shots else [])
    if distributed.is_main():
        print(opening_summary(recipe.eval, model_source, len(examples)), flush=True)
    started = time.perf_counter()
    predictions = generate_predictions(recipe, model, tokenizer, examples, accelerator.device,
                                       synced_gpus=distributed.zero3(accelerator), autocast=accelerator.autocast,
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


def opening_summary(e: EvalConfig, model_source: str, dialogues: int) -> str:
    decoding = ("sampling" if e.do_sample else "greedy" if e.num_beams == 1 else f"beam search ({e.num_beams} beams)")
    processes = distributed.world_size()
    return (f"evaluating {model_source} on {e.split}: {dialogues} dialogues, {decoding}, up to {e.max_new_tokens} new "
            f"tokens, batches of {e.batch_size} per process x {processes} process{'' if processes == 1 else 'es'}")


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


def spread_score_matrix(predictions: list[Prediction]) -> list:
    """`score_matrix` of all predictions, each rank scoring its share; on every rank, in dataset order."""
    share = spread_scores([p.prediction for p in predictions], [p.references for p in predictions],
                          distributed.rank(), distributed.world_size())
    return interleave(distributed.gather_objects(share))


def run_eval(recipe: Recipe, *, checkpoint: Path | None, output_dir: Path | None, overwrite: bool,
             skip_finished: bool = False) -> dict | None:
    """`dsum eval`: load the model the arguments name, then evaluate it.

    SIGUSR1 or SIGTERM, from the start: stop after the current batch, keeping what is generated.
    """
    from accelerate import Accelerator

    from dsum.modeling import warn_of_remote_code

    warn_of_remote_code(recipe)
    output_dir = output_dir or Path(recipe.output_dir) / "eval"
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
    source = model_source(recipe, checkpoint)
    check_partial(output_dir, evaluation_identity(recipe, source))  # before the model is loaded: fail fast
    with StopSignals() as stop:
        model, tokenizer = load_for_eval(recipe, checkpoint)
        model = prepare_for_inference(accelerator, model, recipe)
        return evaluate(recipe, model=accelerator.unwrap_model(model), tokenizer=tokenizer, output_dir=output_dir,
                        accelerator=accelerator, model_source=source, stop=stop)


def check_checkpoint_family(recipe: Recipe, checkpoint: Path) -> None:
    """A checkpoint is evaluated with the recipe's model family: a seq2seq model under a causal recipe
    (or the reverse) is refused in one line instead of failing deep in transformers."""
    if (checkpoint / "adapter_config.json").is_file():
        task = json.loads((checkpoint / "adapter_config.json").read_text()).get("task_type")
        family = {"SEQ_2_SEQ_LM": "seq2seq", "CAUSAL_LM": "causal"}.get(task)
        what = f"a {task} adapter"
    elif (checkpoint / "config.json").is_file():
        from transformers import AutoConfig

        from dsum.modeling import config_family

        config = AutoConfig.from_pretrained(checkpoint)
        family = config_family(config)
        what = f"a {config.model_type} model, {family}"
    else:
        return  # load_for_eval says what is missing
    if family is not None and family != recipe.model.family:
        raise RecipeError(f"--checkpoint {checkpoint}: {what}, but the recipe's model.family is "
                          f"{recipe.model.family}; evaluate it with the recipe it was trained with")


def model_source(recipe: Recipe, checkpoint: Path | None) -> str:
    """The evaluated model as metrics.json names it: the checkpoint, or the base alone (zero-shot)."""
    if checkpoint is not None:
        return str(checkpoint.resolve())
    return recipe.model.name_or_path or str((Path(recipe.output_dir) / BASE_DIR).resolve())


def prepare_for_inference(accelerator, model, recipe: Recipe):
    """On the device; under DeepSpeed, in an engine (ZeRO-3 shards the weights across ranks)."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return model.to(accelerator.device)
    ds = plugin.deepspeed_config
    ds["train_micro_batch_size_per_gpu"] = recipe.eval.batch_size
    ds["gradient_accumulation_steps"] = 1
    ds["train_batch_size"] = recipe.eval.batch_size * distributed.world_size()
    return accelerator.prepare(model)


def load_for_eval(recipe: Recipe, checkpoint: Path | None):
    """(model, tokenizer): a full checkpoint, an adapter on its base, or the recipe's base alone."""
    from transformers import AutoTokenizer

    from dsum.modeling import load_model, load_tokenizer

    if checkpoint is not None and not checkpoint.is_dir():
        raise RecipeError(f"--checkpoint {checkpoint}: no such directory")
    if checkpoint is not None:
        check_checkpoint_family(recipe, checkpoint)
    run_dir = Path(recipe.output_dir)
    base = recipe.model.name_or_path or run_dir / BASE_DIR
    if recipe.model.name_or_path is None and not (run_dir / BASE_DIR / "config.json").is_file():
        raise RecipeError(f"model.architecture: no random-init base in {run_dir / BASE_DIR}; train the recipe first")
    if checkpoint is None:
        tokenizer = load_tokenizer(recipe, run_dir)
        return load_model(recipe, base, for_training=False), tokenizer
    tokenizer = (AutoTokenizer.from_pretrained(checkpoint) if (checkpoint / "tokenizer_config.json").is_file()
                 else load_tokenizer(recipe, run_dir))
    if (checkpoint / "adapter_config.json").is_file():
        from peft import PeftModel

        config = json.loads((checkpoint / "adapter_config.json").read_text())
        base = config.get("base_model_name_or_path") or base
        model = PeftModel.from_pretrained(load_model(recipe, base, for_training=False), checkpoint)
        return (model.merge_and_unload() if recipe.eval.merge_adapter else model), tokenizer
    if (checkpoint / "config.json").is_file():
        recipe = recipe.model_copy(update={"adapter": recipe.adapter.model_copy(update={"method": "none"})})
        return load_model(recipe, checkpoint, for_training=False), tokenizer
    raise RecipeError(f"--checkpoint {checkpoint}: neither a model (config.json) nor an adapter (adapter_config.json)")
