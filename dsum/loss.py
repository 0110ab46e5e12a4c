"""The training loss: cross-entropy summed over a micro-batch's target tokens, in chunks of rows. The caller
divides the sum by the target tokens of the whole accumulation window, so an optimizer step's loss is a per-token
mean however the window is cut."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dsum import cpu_speed
from dsum.features import IGNORE_INDEX

# Logits upcast to fp32 at a time: 64 M elements, 256 MB (about 2,000 rows of a 32,000-token vocabulary).
CHUNK_ELEMENTS = 1 << 26
LOSS_KEYS = ("labels", "target_positions", "target_labels")  # read by the loss, never passed to the model


class TokenLoss:
    """Cross-entropy summed over a batch's target tokens (the caller divides by the window's count).

    `targets_only` (causal models whose forward takes positions in `logits_to_keep`, see
    `dsum.modeling.logits_for_targets_only`): the output head runs at the positions that predict a
    target alone. The loss is the same; the head's FLOPs over the prompt are saved, and so is the
    memory of their logits (131 MB in fp32 for one 1,024-token row of a 32,000-token vocabulary). The
    positions are the batch's `target_positions` (with `target_labels`), padded to the row with the
    most, which the collator worked out on the host; on a CPU, exactly the targets, selected by a mask
    (`cpu_speed.exact_targets`).
    """

    def __init__(self, family: str, targets_only: bool = False):
        self.family, self.targets_only = family, targets_only

    def __call__(self, model, batch: dict[str, torch.Tensor], label_smoothing: float = 0.0) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k not in LOSS_KEYS}
        if self.family == "seq2seq":
            return chunked_cross_entropy(model(**inputs, use_cache=False).logits, batch["labels"], label_smoothing)
        if self.targets_only and cpu_speed.exact_targets(batch["labels"].device):
            labels = batch["labels"][:, 1:]
            kept = labels != IGNORE_INDEX  # read back to count the kept positions: free on a CPU
            logits = model(**inputs, logits_to_keep=F.pad(kept, (0, 1)), use_cache=False).logits
            return chunked_cross_entropy(logits, labels[kept], label_smoothing)
        if self.targets_only:
            logits = model(**inputs, logits_to_keep=batch["target_positions"], use_cache=False).logits
            return chunked_cross_entropy(logits, batch["target_labels"], label_smoothing)
        logits = model(**inputs, use_cache=False).logits
        return chunked_cross_entropy(logits[:, :-1], batch["labels"][:, 1:], label_smoothing)  # t predicts t + 1


def chunked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0,
                          chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """`F.cross_entropy(logits.float(), labels, ignore_index=-100, reduction="sum", label_smoothing=...)`,
    computed `chunk_elements` logits at a time (in fp32 whatever the logits' dtype).

    With gradients, each chunk's gradient is computed as its loss is and kept in the logits' dtype:
    p - (1 - s) onehot(y) - s / V for a target y, smoothing s and vocabulary V; 0 for ignored rows.
    Without (validation), only the loss. So fp32 logits of a whole micro-batch never exist at once, and what is
    kept for the backward pass is one gradient in the logits' dtype."""
    vocab = logits.shape[-1]
    flat, targets = logits.reshape(-1, vocab), labels.reshape(-1)
    rows = max(1, chunk_elements // vocab)
    if torch.is_grad_enabled() and logits.requires_grad:
        return _ChunkedCrossEntropy.apply(logits, labels, label_smoothing, rows)
    total = torch.zeros((), dtype=torch.float32, device=logits.device)
    for start in range(0, len(flat), rows):
        total += F.cross_entropy(flat[start : start + rows].float(), targets[start : start + rows],
                                 ignore_index=IGNORE_INDEX, reduction="sum", label_smoothing=label_smoothing)
    return total


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, smoothing: float, rows: int) -> torch.Tensor:
        vocab = logits.shape[-1]
        flat, targets = logits.reshape(-1, vocab), labels.reshape(-1)
        grad = torch.empty_like(flat)
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        for start in range(0, len(flat), rows):
            part, target = flat[start : start + rows].float(), targets[start : start + rows]
            kept = (target != IGNORE_INDEX).unsqueeze(1)
            index = target.clamp(min=0).unsqueeze(1)  # ignored rows point at class 0, then count for nothing
            log_probs = torch.log_softmax(part, dim=-1)
            nll = -log_probs.gather(1, index)
            if smoothing:
                nll = (1 - smoothing) * nll - smoothing * log_probs.mean(dim=-1, keepdim=True)
            total += (nll * kept).sum()
            part_grad = log_probs.exp_()  # the softmax, in place of the log-probabilities
            part_grad.scatter_add_(1, index, torch.full_like(nll, smoothing - 1))
            if smoothing:
                part_grad -= smoothing / vocab
            torch.mul(part_grad, kept, out=grad[start : start + rows])  # ignored rows: 0; in the logits' dtype
        ctx.save_for_backward(grad)
        ctx.shape = logits.shape
        return total

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad.mul_(grad_output).view(ctx.shape), None, None, None
