"""What makes dsum faster on a CPU alone, and the one place that decides where each applies: on a CPU, never on
a GPU, where none has been shown to pay. `dsum bench` on the CPU measures each, and `--dsum` turns the recipe's
ones off for an A/B run (BENCHMARKS.md has the runs)."""

from __future__ import annotations

import functools
import os

import torch

from dsum.config import EvalConfig, TrainConfig


def on_cpu(device: torch.device | str) -> bool:
    return torch.device(device).type == "cpu"


def start_run(device: torch.device | str) -> None:
    """What a run sets for the whole process once its device is known."""
    if on_cpu(device):
        keep_freed_host_memory()


def fast_dropout(model, cfg: TrainConfig, device: torch.device, compiled: bool):
    """dsum's CPU dropout on the model (given back by its `remove()`), or None where it does not apply: not
    with `train.compile`, whose code draws its own masks."""
    if not (cfg.fast_cpu_dropout and on_cpu(device)) or compiled:
        return None
    from dsum.cpu_dropout import FastCpuDropout

    return FastCpuDropout(model)


def exact_targets(device: torch.device | str) -> bool:
    """Whether the loss selects a causal batch's target positions by a mask (dsum/loss.py), so the output head
    runs at exactly the target positions rather than at the collator's positions padded to the row with the most:
    on a CPU, where the head is much of a small model's work and counting the mask's kept positions costs nothing;
    a GPU would wait to count them."""
    return on_cpu(device)


def encoder_batch(e: EvalConfig, device: torch.device | str, synced_gpus: bool) -> int | None:
    """Prompts the encoder takes at a time: eval.encoder_batch_size on a CPU, else None (the whole batch).
    Under ZeRO-3 every rank must make the same forward calls, and the encoder runs inside `generate`."""
    return e.encoder_batch_size if on_cpu(device) and not synced_gpus else None


# glibc's mallopt parameters (<malloc.h>), and the environment through which a user sets them instead.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
KEPT_FREE_BYTES = 1 << 30  # freed memory at the heap's top kept for the next tensors instead of returned
LARGEST_HEAP_BLOCK = 32 << 20  # blocks up to this come from the heap; glibc's ceiling on 64-bit machines
MALLOC_SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")


def keep_freed_host_memory() -> bool:
    """Have glibc's malloc keep the memory of freed tensors for the next ones, as PyTorch's caching
    allocator does on a GPU; True if it was set.

    By default glibc serves a block over 128 KiB (a threshold it raises as such blocks are freed) with a
    fresh mapping that it unmaps when the block is freed, and it trims the heap's top once it holds
    twice that. A CPU run then page-faults a batch's activations, attention scores and KV cache in
    anew, batch after batch (BENCHMARKS.md has what this costs batched generation). The freed memory stays
    with the process instead: up to KEPT_FREE_BYTES of it at the heap's top. Nothing is changed off
    glibc, or where the user set glibc's malloc tunables (GLIBC_TUNABLES, MALLOC_*_ variables)."""
    import ctypes
    import platform

    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if platform.libc_ver()[0] != "glibc" or "glibc.malloc." in tunables or any(map(os.environ.get, MALLOC_SETTINGS)):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    # Setting the mmap threshold also stops glibc from moving it (and the trim threshold with it).
    return bool(libc.mallopt(M_TRIM_THRESHOLD, KEPT_FREE_BYTES) and libc.mallopt(M_MMAP_THRESHOLD, LARGEST_HEAP_BLOCK))


def encode_in_parts(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, part: int):
    """The encoder's output for right-padded prompts, `part` prompts at a time, each part cut to its own
    longest prompt and its output padded back with zeros, which the attention mask hides.

    On a CPU this is faster than one pass over the whole batch: T5's attention builds a (rows, heads,
    width, width) bias in every layer, and a few rows' of it stay in the cache (BENCHMARKS.md)."""
    from transformers.modeling_outputs import BaseModelOutput

    encoder, width, states = model.get_encoder(), input_ids.shape[1], []
    for start in range(0, len(input_ids), part):
        rows = slice(start, start + part)
        own = int(attention_mask[rows].sum(dim=1).max())
        hidden = encoder(input_ids=input_ids[rows, :own], attention_mask=attention_mask[rows, :own]).last_hidden_state
        states.append(torch.nn.functional.pad(hidden, (0, 0, 0, width - own)))
    return BaseModelOutput(last_hidden_state=torch.cat(states))


class GrowingLayer:
    """A KV cache layer that writes each step's keys and values into room kept at the end of a buffer
    and attends over a view of its filled part; transformers' DynamicLayer concatenates the whole
    cache anew at every step instead. The buffer grows ROOM positions at a time. Where another method
    replaces `keys` (a beam reorder, a crop), the next update starts a new buffer from what it left.
    Mixed into DynamicLayer by `growing_layer_class`, for everything but `update`."""

    ROOM = 64

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if getattr(self, "_view", None) is not self.keys:  # a first update, or keys replaced by another method
            kept = self.keys.numel() > 0
            self._filled = self.keys.shape[-2] if kept else 0
            self._keys, self._values = (self.keys, self.values) if kept else (None, None)
        start, end = self._filled, self._filled + key_states.shape[-2]
        if self._keys is None or self._keys.shape[-2] < end:
            self._keys = self._grown(self._keys, start, key_states, end + self.ROOM)
            self._values = self._grown(self._values, start, value_states, end + self.ROOM)
        self._keys[..., start:end, :] = key_states
        self._values[..., start:end, :] = value_states
        self._filled = end
        self.keys, self.values = self._keys[..., :end, :], self._values[..., :end, :]
        self._view = self.keys
        return self.keys, self.values

    @staticmethod
    def _grown(buffer: torch.Tensor | None, filled: int, like: torch.Tensor, length: int) -> torch.Tensor:
        grown = like.new_empty(*like.shape[:-2], length, like.shape[-1])
        if filled:
            grown[..., :filled, :] = buffer[..., :filled, :]
        return grown


@functools.cache
def growing_layer_class() -> type:
    from transformers.cache_utils import DynamicLayer

    return type("GrowingDynamicLayer", (GrowingLayer, DynamicLayer), {})


def growing_cache(model, device: torch.device | str):
    """A fresh KV cache of GrowingLayers for one `generate` call on a CPU under `eval.cache: dynamic` (it gives
    the predictions of the dynamic cache `generate` makes by itself, which the tests check), or None: off the
    CPU, and where the model's decoder has layers other than full attention (sliding windows, for instance),
    transformers' own cache."""
    if not on_cpu(device):
        return None
    from transformers.cache_utils import DynamicCache, DynamicLayer, EncoderDecoderCache

    cache = DynamicCache(config=model.config.get_text_config(decoder=True))
    if not cache.layers or any(type(layer) is not DynamicLayer for layer in cache.layers):
        return None
    cache.layers = [growing_layer_class()() for _ in cache.layers]
    return EncoderDecoderCache(cache, DynamicCache()) if model.config.is_encoder_decoder else cache
