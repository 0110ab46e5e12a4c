"""ROUGE as dsum reports it: rouge_score F1 with the Porter stemmer, as fractions in [0, 1].

The primary figure averages each dialogue's scores over its references, then averages over
dialogues. `rougeLsum` needs one sentence per line; sentences are split here with a rule, so
nothing is downloaded at run time.
"""

from __future__ import annotations

import re
from typing import Sequence

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=\S)")


def split_sentences(text: str) -> str:
    """One sentence per line, for rougeLsum."""
    return "\n".join(s for s in _SENTENCE_END.split(text.strip()) if s)


def rouge(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Mean over dialogues of the mean over each dialogue's references, per ROUGE variant."""
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} reference sets")
    scorer = rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_KEYS, 0.0)
    for prediction, refs in zip(predictions, references):
        per_ref = [scorer.score(split_sentences(ref), split_sentences(prediction)) for ref in refs]
        for key in ROUGE_KEYS:
            totals[key] += sum(s[key].fmeasure for s in per_ref) / len(per_ref)
    n = max(len(predictions), 1)
    return {key: totals[key] / n for key in ROUGE_KEYS}
