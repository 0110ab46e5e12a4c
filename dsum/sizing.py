"""`train.max_tokens_per_batch: auto`: the largest token budget of a micro-batch that fits the device, found by
trial batches on a GPU (`probe`), or an average one where there is no device memory to size against (a CPU)."""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from dsum import distributed
from dsum.config import RunError
from dsum.features import Collator, Feature, round_up

MARGIN = 0.9  # of the largest budget that fitted
BISECTIONS = 3  # halvings of the gap between the last budget that fitted and the first that did not
MAX_TOKENS = 1 << 17  # no trial beyond this many tokens a micro-batch


def auto_budget(fits: Callable[[int], bool], unit: int, cap: int, multiple: int) -> int:
    """The budget to train with, given `fits(budget)` (one trial) and the tokens of one longest row.

    The budget doubles while a trial fits, then halves the gap to the first that did not, a few times; the run
    takes 90% of the largest that fitted, rounded down to the multiple rows are padded to (64 at least), so that
    memory the allocator fragments over changing shapes is not missed.
    """
    if not fits(unit):
        raise RunError(f"train.max_tokens_per_batch: auto: one example of {unit} tokens does not fit on the device "
                       "even alone; lower tokenizer.max_source_length or max_target_length, turn on "
                       "train.gradient_checkpointing, or use a smaller model")
    good, bad = unit, None
    while good * 2 <= cap:
        if not fits(good * 2):
            bad = good * 2
            break
        good *= 2
    for _ in range(BISECTIONS if bad is not None else 0):
        middle = round_up((good + bad) // 2, unit)
        if middle in (good, bad):
            break
        if fits(middle):
            good = middle
        else:
            bad = middle
    step = max(multiple, 64)
    return max(unit, int(good * MARGIN) // step * step)


def probe(model, token_loss, collate: Collator, features: Sequence[Feature], lengths: Sequence[int], *,
          optimizer: str, device: torch.device, autocast, multiple: int) -> int:
    """The budget every rank can train with: each rank's `auto_budget` on its device, the smallest of them.

    The trial batches are the longest example repeated (the most memory a budget can need: every row padded to
    the longest, or the longest packed end to end), trained forward and backward under the run's precision, with
    the optimizer's state held aside as the real steps will hold it.
    """
    longest = max(range(len(features)), key=lambda i: lengths[i])
    unit = round_up(lengths[longest], multiple)
    rows = math.ceil(len(features) / distributed.world_size())
    cap = min(MAX_TOKENS, unit * rows)
    held = sum(p.numel() * state_bytes(optimizer, p) for p in model.parameters() if p.requires_grad)

    def fits(budget: int) -> bool:
        batch = collate.batch([features[longest]] * max(1, budget // unit))
        return trial(model, token_loss, batch.to(device), held, device, autocast)

    return int(distributed.min_all(auto_budget(fits, unit, cap, multiple)))


def state_bytes(optimizer: str, param: torch.Tensor) -> float:
    """Bytes of optimizer state per element of a trainable parameter: AdamW keeps two moments in the
    parameter's dtype, paged 32-bit AdamW two in fp32, 8-bit AdamW two bytes; Adafactor's factored
    moments are next to nothing."""
    return {"adamw": 2 * param.element_size(), "paged_adamw_32bit": 8, "adamw_8bit": 2, "paged_adamw_8bit": 2,
            "adafactor": 0}[optimizer]


def trial(model, token_loss, inputs: dict[str, torch.Tensor], held_bytes: int, device: torch.device,
          autocast) -> bool:
    """Forward and backward of one trial batch, `held_bytes` set aside for the optimizer's state; False
    if the device ran out of memory. The gradients are dropped and the memory given back either way
    (after the error is gone, whose traceback holds the trial's activations)."""
    fitted, aside, loss = False, None, None
    try:
        aside = torch.empty(int(held_bytes), dtype=torch.uint8, device=device)
        with autocast():
            loss = token_loss(model, inputs)
        loss.backward()
        fitted = True
    except torch.OutOfMemoryError:
        pass
    aside = loss = None
    model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return fitted


def device_memory(device: torch.device) -> bool:
    """Whether the device has memory of its own to size batches against (a GPU), rather than the host's."""
    return device.type == "cuda"


def mean_budget(lengths: Sequence[int], per_device_batch_size: int, multiple: int) -> int:
    """Without device memory to size against: per_device_batch_size examples' worth of tokens on average."""
    return round_up(math.ceil(per_device_batch_size * sum(lengths) / len(lengths)), max(multiple, 64))
