"""Dropout for training on the CPU, with PyTorch's distribution and a faster mask (`FastCpuDropout`,
`train.fast_cpu_dropout`)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ATTENTION = "dsum_cpu_dropout"
# The keywords dsum's attention handles, or that do not change attention's math; any other given a
# value (a sliding window, attention sinks, soft-capping) sends the call to transformers' sdpa, with
# PyTorch's dropout.
HANDLED = {"dropout", "scaling", "position_bias", "is_causal", "position_ids", "cache_position", "use_cache",
           "output_attentions"}


def fast_dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """`F.dropout(x, p, training)`, drawing the mask from random integers.

    PyTorch draws a CPU dropout mask with `bernoulli_`. Here random 31-bit integers are drawn and an element is
    kept where the integer is at least p x 2^31: each element is kept with probability 1 - p, independently, and
    scaled by 1 / (1 - p), as PyTorch does; p is rounded to a multiple of 2^-31. On the 2-core machine of
    BENCHMARKS.md ("dropout on the CPU", side checks) the mask took about half the time of PyTorch's. The draws
    come from torch's default CPU generator, so seeding, checkpoints and activation checkpointing see them as
    they see PyTorch's.
    """
    if not training or p == 0.0:
        return x
    keep = torch.empty(x.shape, dtype=torch.int32, device=x.device).random_() >= round(p * 2**31)
    return x * keep.to(x.dtype).mul_(1.0 / (1.0 - p))


class Dropout(nn.Dropout):
    """`nn.Dropout` with the mask drawn by `fast_dropout`; the class a module is switched to and back from."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fast_dropout(x, self.p, self.training)


def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
              position_bias: torch.Tensor | None = None, **kwargs: Any):
    """Eager attention (transformers' math: T5's position bias, grouped keys and values, an additive
    mask) with the dropout above, where it is training with dropout on the CPU; sdpa otherwise."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    is_causal = kwargs.get("is_causal", getattr(module, "is_causal", False))
    causal_unmasked = attention_mask is None and is_causal and query.shape[2] > 1
    if (not module.training or dropout == 0.0 or query.device.type != "cpu" or causal_unmasked
            or any(given is not None for name, given in kwargs.items() if name not in HANDLED)):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      position_bias=position_bias, **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    scores = torch.matmul(query, key.transpose(2, 3)) * (query.shape[-1] ** -0.5 if scaling is None else scaling)
    if position_bias is not None:
        scores = scores + position_bias
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, : key.shape[-2]]
    weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    output = torch.matmul(fast_dropout(weights, dropout), value)
    return output.transpose(1, 2).contiguous(), weights


def register() -> None:
    """dsum's attention in transformers' registries, with the additive masks eager attention takes."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(ATTENTION, attention)
    AttentionMaskInterface.register(ATTENTION, eager_mask)


class FastCpuDropout:
    """Switches a model's dropout to the fast draws above; `remove()` switches it back, before the model is
    saved or evaluated. Used on the CPU only, where `train.fast_cpu_dropout` (on by default) asks for it.

    - the model's `nn.Dropout` modules (hidden states, LoRA's dropout) draw this way;
    - a model whose attention has dropout (FLAN-T5's `dropout_rate`) gets dsum's attention function, registered
      with transformers' AttentionInterface: in training, transformers' eager attention with this dropout;
      otherwise, and for anything it does not handle, transformers' sdpa. PyTorch's sdpa draws its dropout
      inside the kernel, where nothing else can, and on the CPU that was most of it.
    """

    def __init__(self, model: nn.Module):
        from transformers import PreTrainedModel

        # Only modules that drop something: a model built with dropout 0 keeps PyTorch's (a no-op) and says nothing.
        self.modules = [m for m in model.modules() if type(m) is nn.Dropout and m.p > 0.0]
        for module in self.modules:
            module.__class__ = Dropout
        self.pretrained = next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)
        config = getattr(self.pretrained, "config", None)
        # The attention implementation replaced, if any: sdpa or eager, whose math dsum's repeats; others stay.
        self.attention = (config._attn_implementation if config is not None and attention_dropout(config) > 0.0
                          and config._attn_implementation in ("sdpa", "eager") else None)
        if self.attention is not None:
            register()
            self.pretrained.set_attn_implementation(ATTENTION)

    @property
    def active(self) -> bool:
        return bool(self.modules) or self.attention is not None

    def remove(self) -> None:
        for module in self.modules:
            module.__class__ = nn.Dropout
        if self.attention is not None:
            self.pretrained.set_attn_implementation(self.attention)

    def describe(self) -> str:
        attention = f"; attention {ATTENTION} in place of {self.attention}" if self.attention else ""
        return f"fast CPU dropout: {len(self.modules)} dropout modules{attention}"


def attention_dropout(config) -> float:
    """The dropout a transformers config gives attention probabilities: `attention_dropout` (Llama,
    BART), else T5's `dropout_rate`, which T5 applies to them too; 0 where it names neither."""
    for name in ("attention_dropout", "dropout_rate"):
        if getattr(config, name, None) is not None:
            return float(getattr(config, name))
    return 0.0
