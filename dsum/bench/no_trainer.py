"""The no_trainer way, as transformers' `run_summarization_no_trainer` example: a plain Accelerate loop
over shuffled batches padded to their longest row, then batched generation over the flattened test rows."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

from dsum.bench.harness import EvalSpeed, TrainSpeed, synchronize
from dsum.bench.peers import (CountingCollator, feature_real_tokens, flattened_rows, generate, mean_length, new_tokens,
                              timed_window)
from dsum.bench.sizes import Sizes
from dsum.config import Recipe
from dsum.profiling import StepProfiler


def train_no_trainer(recipe: Recipe, base: Path, tokenizer, features: Sequence, sizes: Sizes,
                     device: str, profile: StepProfiler | None = None) -> TrainSpeed:
    """An Accelerate loop over dynamically padded, shuffled batches, AdamW, the model's mean loss, no
    gradient clipping (the script has none); timed after each optimizer step."""
    import torch
    from accelerate import Accelerator
    from torch.utils.data import DataLoader
    from transformers import DataCollatorForSeq2Seq, get_scheduler

    from dsum.features import IGNORE_INDEX
    from dsum.modeling import load_model

    family, cfg = recipe.model.family, recipe.train
    accelerator = Accelerator(gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                              mixed_precision=cfg.mixed_precision, cpu=device == "cpu")
    # The script pads to a multiple of 8 under mixed precision (tensor cores).
    pad_collator = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX,
                                          pad_to_multiple_of=8 if cfg.mixed_precision != "no" else None)
    collator = CountingCollator(pad_collator, family)
    rows = [{"input_ids": f.input_ids, "labels": f.labels} for f in features]
    loader = DataLoader(rows, batch_size=cfg.per_device_batch_size, shuffle=True, collate_fn=collator,
                        generator=torch.Generator().manual_seed(sizes.seed))
    model = load_model(recipe, base)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
                                   {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                                  lr=cfg.learning_rate)
    total = sizes.warmup_steps + sizes.train_steps
    scheduler = get_scheduler("constant", optimizer, num_warmup_steps=0, num_training_steps=total)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    model.train()
    step_ends: list[float] = []
    with profile or StepProfiler.off() as profile:
        while len(step_ends) < total:
            for batch in loader:
                with accelerator.accumulate(model):
                    loss = model(**batch).loss
                    accelerator.backward(loss)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad()
                if accelerator.sync_gradients:
                    synchronize(device)
                    step_ends.append(time.perf_counter())
                    profile.step()
                    if len(step_ends) == total:
                        break
    seconds, real, processed, n = timed_window(step_ends, collator.counts, sizes, cfg.gradient_accumulation_steps)
    accelerator.free_memory()
    return TrainSpeed(sizes.train_steps, seconds, real, processed, len(rows), feature_real_tokens(features, family), n,
                      {"padding": "longest in batch (DataCollatorForSeq2Seq)", "order": "random (shuffled DataLoader)",
                       "max_grad_norm": None})


def eval_no_trainer(recipe: Recipe, model, tokenizer, examples: Sequence, sizes: Sizes, device: str, part: int,
                    parts: int) -> EvalSpeed:
    """Batches of the script's eval batch size over the flattened rows, in dataset order (every
    parts-th batch, from `part`, in this round)."""
    import torch

    from dsum.features import Featurizer

    rows = flattened_rows(examples)
    featurizer = Featurizer(recipe, tokenizer)
    family, size = recipe.model.family, sizes.no_trainer_eval_batch
    left = family == "causal"  # a decoder-only model continues from the right edge
    generated = []
    with torch.no_grad():
        generate(model, tokenizer, recipe, [featurizer.prompt_ids(examples[0].dialogue)], device, left)  # warm-up
        synchronize(device)
        started = time.perf_counter()
        for start in range(0, len(rows), size)[part::parts]:
            prompts = featurizer.prompts_ids([examples[i].dialogue for i, _ in rows[start : start + size]])
            output, width = generate(model, tokenizer, recipe, prompts, device, left)
            tokens = new_tokens(output, width, family, tokenizer)
            tokenizer.batch_decode(tokens, skip_special_tokens=True)
            generated += tokens
        synchronize(device)
        seconds = time.perf_counter() - started
    return EvalSpeed(len(examples), len(rows), len(generated), size, seconds, mean_length(generated))
