"""Evaluation of a model on a recipe's `eval.split`: generate, score, write `predictions.jsonl` and `metrics.json`."""

from __future__ import annotations

import json
import time
from pathlib import Path

from dsum import distributed
from dsum.config import Recipe
from dsum.data import load_split
from dsum.generate import generate_predictions
from dsum.scoring import ROUGE_KEYS, rouge


def evaluate(recipe: Recipe, *, model, tokenizer, output_dir: Path, accelerator) -> dict:
    examples = load_split(recipe.data, recipe.eval.split)[: recipe.eval.max_samples]
    zero3 = getattr(accelerator.state.deepspeed_plugin, "zero_stage", 0) == 3
    started = time.perf_counter()
    predictions = generate_predictions(recipe, model, tokenizer, examples, accelerator.device,
                                       synced_gpus=zero3, autocast=accelerator.autocast)
    seconds = time.perf_counter() - started
    metrics = {
        **rouge([p.prediction for p in predictions], [p.references for p in predictions]),
        "n": len(predictions),
        "split": recipe.eval.split,
        "mean_generated_tokens": sum(p.generated_tokens for p in predictions) / max(len(predictions), 1),
        "generation_seconds": seconds,
        "dialogues_per_second": len(predictions) / seconds if seconds else None,
    }
    if distributed.is_main():
        output_dir.mkdir(parents=True, exist_ok=True)
        with (output_dir / "predictions.jsonl").open("w") as f:
            for p in predictions:
                f.write(json.dumps(p.as_dict(), ensure_ascii=False) + "\n")
        (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        print(rouge_table(metrics), flush=True)
    distributed.barrier()
    return metrics


def rouge_table(metrics: dict) -> str:
    lines = [f"ROUGE on {metrics['split']} (n={metrics['n']}, mean over references, then dialogues)",
             "| metric    | F1     |", "| --------- | ------ |"]
    lines += [f"| {key:<9} | {metrics[key]:.4f} |" for key in ROUGE_KEYS]
    return "\n".join(lines)
