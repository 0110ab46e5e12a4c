"""The notebook way, as the popular course notebook fine-tunes FLAN-T5 on DialogSum: `transformers.Trainer`
on examples padded to max_length, then generation one flattened test row at a time."""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Sequence

from dsum.bench.harness import EvalSpeed, TrainSpeed, synchronize
from dsum.bench.peers import (CountingCollator, flattened_rows, generate, mean_length, new_tokens, timed_window,
                              token_counts)
from dsum.bench.sizes import Sizes
from dsum.config import Recipe
from dsum.profiling import StepProfiler


def notebook_widths(family: str, sizes: Sizes) -> tuple[int, int]:
    """(input, label) widths of the notebook's max_length padding. It pads inputs and labels alike to
    the tokenizer's 512; a causal row holds the prompt and the summary, so it is padded to 512 + 128."""
    if family == "seq2seq":
        return sizes.max_source_length, sizes.max_source_length
    width = sizes.max_source_length + sizes.max_target_length
    return width, width


def notebook_dataset(features: Sequence, family: str, pad_id: int, sizes: Sizes) -> list[dict]:
    """The notebook's tokenized dataset: every example padded to max_length, once, before training.
    Padded labels are -100 (the notebook leaves pad ids there, and so also trains on padding; the
    compute is the same, and the loss stays the one the other ways minimise)."""
    import torch

    from dsum.features import IGNORE_INDEX

    width, label_width = notebook_widths(family, sizes)
    rows = []
    for f in features:
        rows.append({
            "input_ids": torch.tensor(f.input_ids + [pad_id] * (width - len(f.input_ids))),
            "attention_mask": torch.tensor([1] * len(f.input_ids) + [0] * (width - len(f.input_ids))),
            "labels": torch.tensor(f.labels + [IGNORE_INDEX] * (label_width - len(f.labels))),
        })
    return rows


def stack(rows: list[dict]) -> dict:
    import torch

    return {key: torch.stack([row[key] for row in rows]) for key in rows[0]}


def train_notebook(recipe: Recipe, base: Path, tokenizer, features: Sequence, sizes: Sizes, device: str,
                   workdir: Path, profile: StepProfiler | None = None) -> TrainSpeed:
    """Trainer, max_length padding, random order; timed by a callback at each step's end."""
    from transformers import Trainer, TrainerCallback, TrainingArguments
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from dsum.modeling import load_model

    family, cfg = recipe.model.family, recipe.train
    dataset = notebook_dataset(features, family, tokenizer.pad_token_id, sizes)
    collator = CountingCollator(stack, family)
    step_ends: list[float] = []
    profile = profile or StepProfiler.off()

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            synchronize(device)
            step_ends.append(time.perf_counter())
            profile.step()

    args = TrainingArguments(
        output_dir=str(workdir / "notebook"), per_device_train_batch_size=cfg.per_device_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps, learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay, lr_scheduler_type="constant", max_grad_norm=cfg.max_grad_norm or 0.0,
        max_steps=sizes.warmup_steps + sizes.train_steps, bf16=cfg.mixed_precision == "bf16",
        use_cpu=device == "cpu", seed=sizes.seed, report_to="none", logging_strategy="no", save_strategy="no",
        eval_strategy="no", disable_tqdm=True, dataloader_num_workers=0, remove_unused_columns=False,
    )
    trainer = Trainer(model=load_model(recipe, base), args=args, train_dataset=dataset, data_collator=collator,
                      callbacks=[StepClock()])
    for quiet in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(quiet)
    with profile:
        trainer.train()
    seconds, real, processed, rows = timed_window(step_ends, collator.counts, sizes, cfg.gradient_accumulation_steps)
    dataset_real = sum(token_counts(row, family)[0] for row in dataset)
    del trainer
    return TrainSpeed(sizes.train_steps, seconds, real, processed, len(dataset), dataset_real, rows,
                      {"padding": "max_length", "input_width": notebook_widths(family, sizes)[0],
                       "label_width": notebook_widths(family, sizes)[1], "order": "random (Trainer's sampler)",
                       "max_grad_norm": cfg.max_grad_norm})


def eval_notebook(recipe: Recipe, model, tokenizer, examples: Sequence, sizes: Sizes, device: str, part: int,
                  parts: int) -> EvalSpeed:
    """One row at a time over the flattened split: a fixed random sample of rows is timed (every
    parts-th of it, from `part`, in this round), and the time is scaled to all the rows."""
    import torch

    from dsum.features import Featurizer

    rows = flattened_rows(examples)
    sample = sorted(random.Random(sizes.seed).sample(range(len(rows)), min(sizes.notebook_rows, len(rows))))
    timed = sample[part::parts]
    featurizer = Featurizer(recipe, tokenizer)
    family = recipe.model.family
    generated = []
    with torch.no_grad():
        generate(model, tokenizer, recipe, [featurizer.prompt_ids(examples[0].dialogue)], device, left=False)  # warm-up
        synchronize(device)
        started = time.perf_counter()
        for index in timed:
            prompt = featurizer.prompt_ids(examples[rows[index][0]].dialogue)
            output, width = generate(model, tokenizer, recipe, [prompt], device, left=False)
            tokens = new_tokens(output, width, family, tokenizer)
            tokenizer.decode(tokens[0], skip_special_tokens=True)
            generated += tokens
        synchronize(device)
        seconds = time.perf_counter() - started
    return EvalSpeed(len(examples), len(rows), len(timed), 1, seconds, mean_length(generated))
