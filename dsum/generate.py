"""Batched generation sharded over every process, gathered back into dataset order.

Prompts are sorted longest first so that batches hold similar lengths (and memory runs out early if
it will); rank r takes every world_size-th prompt of that order. Every rank makes the same number
of `generate` calls, which ZeRO-3 (`synced_gpus`) needs: a rank that runs out repeats its last
batch and drops the result. Causal prompts are left-padded and the prompt is cut from the output.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Sequence

import torch

from dsum import distributed
from dsum.config import Recipe
from dsum.data import Example
from dsum.features import Featurizer, pad


@dataclass
class Prediction:
    id: str
    prediction: str
    references: list[str]
    prompt_tokens: int
    generated_tokens: int

    def as_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def generate_predictions(recipe: Recipe, model, tokenizer, examples: Sequence[Example], device,
                         *, synced_gpus: bool = False, autocast=nullcontext) -> list[Prediction]:
    """Predictions for every example, in dataset order, on every rank."""
    featurizer = Featurizer(recipe, tokenizer)
    prompt_ids = [featurizer.prompt_ids(e.dialogue) for e in examples]
    order = sorted(range(len(examples)), key=lambda i: (-len(prompt_ids[i]), i))
    world, rank = distributed.world_size(), distributed.rank()
    mine = order[rank::world]
    batch_size = recipe.eval.batch_size
    calls = math.ceil(math.ceil(len(examples) / world) / batch_size)
    left = recipe.model.family == "causal"
    model.eval()
    results: list[Prediction] = []
    for call in range(calls):
        ids = mine[call * batch_size : (call + 1) * batch_size]
        repeat = not ids  # this rank is out of work but must still join the collective calls
        ids = ids or mine[-batch_size:] or order[:1]
        rows = [prompt_ids[i] for i in ids]
        input_ids = pad(rows, tokenizer.pad_token_id, left=left).to(device)
        attention_mask = pad([[1] * len(r) for r in rows], 0, left=left).to(device)
        with autocast():
            output = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                **generation_kwargs(recipe, tokenizer),
                synced_gpus=synced_gpus,
            )
        if left:
            output = output[:, input_ids.shape[1] :]
        if repeat:
            continue
        for i, row, tokens in zip(ids, rows, output.tolist()):
            tokens = strip_padding(tokens, tokenizer)
            results.append(Prediction(
                id=examples[i].id,
                prediction=tokenizer.decode(tokens, skip_special_tokens=True).strip(),
                references=list(examples[i].references),
                prompt_tokens=len(row),
                generated_tokens=len(tokens),
            ))
    gathered = {p.id: p for shard in distributed.gather_objects(results) for p in shard}
    return [gathered[e.id] for e in examples]


def generation_kwargs(recipe: Recipe, tokenizer) -> dict:
    e = recipe.eval
    kwargs = {
        "max_new_tokens": e.max_new_tokens,
        "num_beams": e.num_beams,
        "do_sample": e.do_sample,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    if e.do_sample:
        kwargs.update(temperature=e.temperature, top_p=e.top_p)
    if e.no_repeat_ngram_size:
        kwargs["no_repeat_ngram_size"] = e.no_repeat_ngram_size
    return kwargs


def strip_padding(tokens: list[int], tokenizer) -> list[int]:
    """Generated tokens up to and including the first EOS, without the seq2seq start token."""
    start = tokens[1:] if tokens and tokens[0] == tokenizer.pad_token_id else tokens
    if tokenizer.eos_token_id in start:
        start = start[: start.index(tokenizer.eos_token_id) + 1]
    return [t for t in start if t != tokenizer.pad_token_id]
