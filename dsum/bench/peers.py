"""What the two peer ways (`notebook`, `no_trainer`) share: their batches counted as dsum counts its own,
the timed window of their steps, and their `generate` calls over the flattened test rows."""

from __future__ import annotations

from typing import Sequence

from dsum.bench.sizes import Sizes
from dsum.config import Recipe


def token_counts(batch: dict, family: str) -> tuple[int, int]:
    """(real, processed) tokens of a padded training batch of the other ways, counted from its tensors as
    dsum counts its own from their features (`MicroBatch`; the tests hold the two together): real, the
    encoder's unmasked tokens and the decoder's targets, or a causal row's unmasked tokens; processed,
    every position computed, padding included (a seq2seq decoder computes as many as the labels are wide)."""
    from dsum.features import IGNORE_INDEX

    real = int(batch["attention_mask"].sum())
    processed = batch["input_ids"].numel()
    if family == "seq2seq":
        real += int((batch["labels"] != IGNORE_INDEX).sum())
        processed += batch["labels"].numel()
    return real, processed


def feature_real_tokens(features: Sequence, family: str) -> int:
    from dsum.features import IGNORE_INDEX

    return sum(len(f.input_ids) + (sum(t != IGNORE_INDEX for t in f.labels) if family == "seq2seq" else 0)
               for f in features)


class CountingCollator:
    """Wraps a collator and counts every batch it makes, in the order the loop takes them."""

    def __init__(self, collate, family: str):
        self.collate, self.family = collate, family
        self.counts: list[tuple[int, int, int]] = []

    def __call__(self, rows):
        batch = self.collate(rows)
        self.counts.append((*token_counts(batch, self.family), len(batch["input_ids"])))
        return batch


def timed_window(step_ends: list[float], micro_counts: list[tuple[int, int, int]], sizes: Sizes,
                 accumulation: int) -> tuple[float, int, int, int]:
    """Seconds, real and processed tokens and rows of the timed steps: from the end of the warm-up's
    last optimizer step to the end of the last timed one, over the micro-batches in between."""
    first, last = sizes.warmup_steps, sizes.warmup_steps + sizes.train_steps
    if len(step_ends) < last:
        raise RuntimeError(f"the loop ran {len(step_ends)} optimizer steps, fewer than the {last} benched")
    window = micro_counts[first * accumulation : last * accumulation]
    return (step_ends[last - 1] - step_ends[first - 1], sum(c[0] for c in window), sum(c[1] for c in window),
            sum(c[2] for c in window))


def flattened_rows(examples: Sequence) -> list[tuple[int, str]]:
    """The Hub's flattened test split: (dialogue index, reference), one row per reference, in order."""
    return [(i, reference) for i, example in enumerate(examples) for reference in example.references]


def generate(model, tokenizer, recipe: Recipe, prompts: list[list[int]], device: str, left: bool):
    """One `generate` call on these prompts with dsum's generation settings (every way uses the same)."""
    from dsum.generate import generation_kwargs

    batch = tokenizer.pad({"input_ids": prompts}, padding_side="left" if left else "right", return_tensors="pt")
    return model.generate(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                          **generation_kwargs(recipe, tokenizer)), batch["input_ids"].shape[1]


def new_tokens(output, prompt_width: int, family: str, tokenizer) -> list[list[int]]:
    """Generated tokens per row, counted as dsum counts them (up to the first EOS, no padding)."""
    from dsum.generate import strip_padding

    if family == "causal":
        output = output[:, prompt_width:]
    return [strip_padding(row, tokenizer) for row in output.tolist()]


def mean_length(rows: list[list[int]]) -> float:
    return sum(map(len, rows)) / len(rows)
