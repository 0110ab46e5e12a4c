"""ROUGE as dsum reports it: rouge_score F1 with the Porter stemmer, as fractions in [0, 1]."""

from __future__ import annotations

import re
import time
from typing import Sequence

import numpy as np

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum")
BOOTSTRAP_SAMPLES = 1000
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=\S)")


def split_sentences(text: str) -> str:
    """One sentence per line, for rougeLsum; split here with a rule, so nothing is downloaded at run time."""
    return "\n".join(s for s in _SENTENCE_END.split(text.strip()) if s)


def score_matrix(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> list[np.ndarray]:
    """For each dialogue, an array (references x ROUGE_KEYS) of F1 scores."""
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} reference sets")
    scorer = rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=True)
    out = []
    for prediction, refs in zip(predictions, references):
        if not refs:
            raise ValueError("every prediction needs at least one reference")
        per_ref = [scorer.score(split_sentences(ref), split_sentences(prediction)) for ref in refs]
        out.append(np.array([[s[key].fmeasure for key in ROUGE_KEYS] for s in per_ref]))
    return out


def spread_scores(predictions: Sequence[str], references: Sequence[Sequence[str]], rank: int,
                  world: int) -> list[np.ndarray]:
    """One process's share of `score_matrix`: dialogues rank, rank + world, rank + 2 * world, ..."""
    return score_matrix(predictions[rank::world], references[rank::world])


def interleave(shares: Sequence[Sequence]) -> list:
    """The shares of `spread_scores` from every rank, in rank order, back in dataset order."""
    world = len(shares)
    return [shares[i % world][i // world] for i in range(sum(map(len, shares)))]


def rouge(predictions: Sequence[str], references: Sequence[Sequence[str]], *, seed: int = 0) -> dict:
    """The metrics object of `metrics.json` and `dsum score`: primary ROUGE, variants, intervals, n."""
    started = time.perf_counter()
    metrics = rouge_from_matrix(score_matrix(predictions, references), seed=seed)
    metrics["scoring_seconds"] = time.perf_counter() - started
    return metrics


def rouge_from_matrix(matrix: list[np.ndarray], *, seed: int = 0) -> dict:
    """`rouge()` from per-dialogue score arrays already computed by `score_matrix`.

    The primary figure averages each dialogue's scores over its references, then averages over dialogues. Two
    variants are reported beside it: `best_reference` (the best-scoring reference of each dialogue) and
    `first_reference` (the first reference only, as single-reference scripts do). A 95% confidence interval for
    each primary figure comes from a seeded bootstrap over dialogues.
    """
    mean_over_refs = np.array([m.mean(axis=0) for m in matrix])  # dialogues x keys
    best = np.array([m.max(axis=0) for m in matrix])
    first = np.array([m[0] for m in matrix])
    low, high = bootstrap_interval(mean_over_refs, seed)
    metrics: dict = {key: float(mean_over_refs[:, i].mean()) for i, key in enumerate(ROUGE_KEYS)}
    metrics.update(
        confidence_interval_95={key: [float(low[i]), float(high[i])] for i, key in enumerate(ROUGE_KEYS)},
        best_reference={key: float(best[:, i].mean()) for i, key in enumerate(ROUGE_KEYS)},
        first_reference={key: float(first[:, i].mean()) for i, key in enumerate(ROUGE_KEYS)},
        n=len(matrix),
        references_per_dialogue=float(np.mean([len(m) for m in matrix])),
    )
    return metrics


def bootstrap_interval(per_dialogue: np.ndarray, seed: int, samples: int = BOOTSTRAP_SAMPLES) -> tuple[np.ndarray, np.ndarray]:
    """2.5th and 97.5th percentiles of the mean over dialogues resampled with replacement."""
    rng = np.random.default_rng(seed)
    n = len(per_dialogue)
    means = np.stack([per_dialogue[rng.integers(0, n, n)].mean(axis=0) for _ in range(samples)])
    return np.percentile(means, 2.5, axis=0), np.percentile(means, 97.5, axis=0)


def rouge_table(metrics: dict, title: str) -> str:
    """A Markdown table of the primary figures with their intervals and the two variants."""
    lines = [title, "| metric    | F1     | 95% CI          | best ref | first ref |",
             "| --------- | ------ | --------------- | -------- | --------- |"]
    for key in ROUGE_KEYS:
        low, high = metrics["confidence_interval_95"][key]
        lines.append(f"| {key:<9} | {metrics[key]:.4f} | {low:.4f} - {high:.4f} | "
                     f"{metrics['best_reference'][key]:.4f}   | {metrics['first_reference'][key]:.4f}    |")
    return "\n".join(lines)


def spread_score_matrix(predictions: Sequence) -> list:
    """`score_matrix` of all predictions (dsum.generate's, with `prediction` and `references`), each rank
    scoring its share; on every rank, in dataset order."""
    from dsum import distributed

    share = spread_scores([p.prediction for p in predictions], [p.references for p in predictions],
                          distributed.rank(), distributed.world_size())
    return interleave(distributed.gather_objects(share))
