"""Where a training step's time goes, and how much memory it holds."""

from __future__ import annotations

import re
import resource
import sys
import time
from collections import defaultdict

import torch

from dsum import distributed
from dsum.features import MicroBatch

PHASES = ("data", "forward_backward", "optimizer")


class StepClock:
    """`lap(name)` closes a phase that began at the previous lap (or at `start()`): `data` (collating and copying
    the batch), `forward_backward`, `optimizer` (clipping, the update, zeroing). On a CPU a lap reads the wall
    clock. On a GPU it records a CUDA event instead, so the loop never waits for the device to measure it; the
    events are resolved when `read()` is called at a logging step, where the loop synchronises anyway."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.pending: list[tuple[str, object, object]] = []  # (phase, start, end): events or floats
        self.last: object = None
        self.total: dict[str, float] = defaultdict(float)

    def _now(self) -> object:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def start(self) -> None:
        self.last = self._now()

    def lap(self, phase: str) -> None:
        now = self._now()
        self.pending.append((phase, self.last, now))
        self.last = now

    def read(self) -> dict[str, float]:
        """Seconds per phase since the last read, and the memory peaks so far."""
        if self.cuda and self.pending:
            self.pending[-1][2].synchronize()
        seconds = dict.fromkeys(PHASES, 0.0)
        for phase, start, end in self.pending:
            seconds[phase] += start.elapsed_time(end) / 1000 if self.cuda else end - start
        self.pending.clear()
        for phase, value in seconds.items():
            self.total[phase] += value
        return {f"{phase}_seconds": value for phase, value in seconds.items()} | peak_memory(self.cuda)

    def summary(self) -> dict[str, float]:
        """Seconds per phase over the run, their shares, and the memory peaks."""
        spent = sum(self.total.values()) or 1.0
        return ({f"{phase}_seconds": self.total[phase] for phase in PHASES}
                | {f"{phase}_share": self.total[phase] / spent for phase in PHASES}
                | peak_memory(self.cuda))


def reset_gpu_peaks(device: torch.device) -> None:
    """Start the GPU peaks afresh, so a run reports its own, not an earlier run's in the same process
    (the bench, a notebook). The host peak cannot be reset: it is the process's."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(cuda: bool) -> dict[str, float]:
    """Peak host RSS of this process, and peak GPU memory allocated and reserved (since `reset_gpu_peaks`), in GiB."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    peaks = {"peak_host_rss_gib": rss / (2**30 if sys.platform == "darwin" else 2**20)}
    if cuda:
        peaks["peak_gpu_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        peaks["peak_gpu_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    return peaks


# ----------------------------------------------------------------------------------------------
# Model FLOPs and MFU

# Dense bf16 peak of one device, FLOP/s, by a name torch.cuda.get_device_name() contains (most specific first).
BF16_PEAK_FLOPS = {
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
}


def device_peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak, or None where it is not known (CPUs, other GPUs): then no MFU."""
    if device.type != "cuda":
        return None
    return peak_flops_of(torch.cuda.get_device_name(device))


def peak_flops_of(device_name: str) -> float | None:
    """By whole words of the name: an "NVIDIA L40" is no L4."""
    return next((peak for key, peak in BF16_PEAK_FLOPS.items()
                 if re.search(rf"\b{re.escape(key)}\b", device_name)), None)


class FlopCounter:
    """Model FLOPs of training on a batch: what the model must compute, not what recomputation adds.

    A token through a matmul with N weights costs 2N forward, 2N for the gradient of its input, and
    2N for the gradient of the weights when they train: 6N for full fine-tuning, 4N + 2N_trainable
    for an adapter on a frozen base. Attention adds, per layer, 4 d T_q T_k forward (scores and their
    use) and twice that backward, counted over whole sequences as usual. Encoder tokens go through
    the encoder's matmuls, decoder and causal tokens through the decoder's, and the output head runs
    at the target tokens only: the loss needs no more (and a causal prompt's logits are not computed
    where the model allows, see `TokenLoss`).
    """

    def __init__(self, model):
        self.weights = {stack: [0, 0] for stack in ("encoder", "decoder", "head")}  # [all, trainable] matmul weights
        head = model.get_output_embeddings()
        head_parts = {id(part) for part in head.modules()} if head is not None else set()
        for name, module in model.named_modules():
            linear = all(hasattr(module, a) for a in ("in_features", "out_features", "weight"))
            if linear and not hasattr(module, "base_layer"):  # an adapter's wrapper: its parts count instead
                stack = ("head" if id(module) in head_parts
                         else "encoder" if "encoder" in name.split(".") else "decoder")
                size = module.in_features * module.out_features  # the true shape, also under ZeRO-3 or 4 bits
                self.weights[stack][0] += size
                self.weights[stack][1] += size if module.weight.requires_grad else 0
        config = model.config
        self.seq2seq = config.is_encoder_decoder
        self.encoder_layers = getattr(config, "num_layers", 0) if config.is_encoder_decoder else 0
        self.decoder_layers = (getattr(config, "num_decoder_layers", None) or getattr(config, "num_layers", 0)
                               if config.is_encoder_decoder else config.num_hidden_layers)
        heads = getattr(config, "num_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "d_kv", None) or getattr(config, "head_dim", None) or config.hidden_size // heads
        self.attention_width = heads * head_dim

    def per_token(self, stack: str) -> int:
        total, trainable = self.weights[stack]
        return 4 * total + 2 * trainable

    def batch(self, batch: MicroBatch) -> float:
        attention = 3 * 4 * self.attention_width  # forward and backward, per layer and per query-key pair
        head = batch.targets * self.per_token("head")  # the logits the loss reads
        if self.seq2seq:  # the encoder over the prompt, the decoder over the targets
            pairs = sum(t * t + t * s for s, t in zip(batch.lengths, batch.target_lengths))
            return float(sum(batch.lengths) * self.per_token("encoder")
                         + sum(batch.target_lengths) * self.per_token("decoder") + head
                         + attention * (self.encoder_layers * sum(s * s for s in batch.lengths)
                                        + self.decoder_layers * pairs))
        return float(sum(batch.lengths) * self.per_token("decoder") + head
                     + attention * self.decoder_layers * sum(n * n for n in batch.lengths))


def telemetry_summary(seen: dict[str, float], loop_seconds: float, set_aside: float, clock: StepClock,
                      peak_flops: float | None, world_size: int) -> dict[str, float]:
    """Throughput, padding efficiency, FLOPs, time split and memory peaks of the loop, since it started or
    resumed. The rates are over its training time: the loop's, less its validations and checkpoint saves."""
    seconds = loop_seconds - set_aside
    return {
        "loop_seconds": loop_seconds,
        "validation_and_checkpoint_seconds": set_aside,
        "training_seconds": seconds,
        "tokens_per_second": seen["real_tokens"] / seconds,
        "processed_tokens_per_second": seen["processed_tokens"] / seconds,
        "padding_efficiency": seen["real_tokens"] / max(seen["processed_tokens"], 1),
        **model_flops(seen["flops"], seconds, peak_flops, world_size),
        **clock.summary(),
    }


def model_flops(flops: float, seconds: float, peak_flops: float | None, world_size: int) -> dict[str, float]:
    """Model TFLOP/s over all ranks and, where the device's bf16 peak is known, MFU: their share of the peaks."""
    achieved = flops / seconds
    record = {"model_tflops_per_second": achieved / 1e12}
    if peak_flops:
        record["mfu"] = achieved / (peak_flops * world_size)
    return record


class LogWindow:
    """Loss and token counts since the last log. The loss sum stays on the device (no host sync per
    micro-batch); a checkpoint carries the window's totals, so a resumed run logs what an
    uninterrupted one would."""

    def __init__(self, device: torch.device, flop_counter: FlopCounter,
                 saved: list[float] | None = None):
        self.loss = torch.zeros((), dtype=torch.float64, device=device)
        self.flop_counter = flop_counter
        self.reset()
        if saved and distributed.is_main():  # the saved totals are over all ranks: count them once
            self.loss += saved[0]
            self.targets, self.real_tokens = int(saved[1]), int(saved[2])
            self.processed = int(saved[3]) if len(saved) > 3 else 0
            self.flops = saved[4] if len(saved) > 4 else 0.0

    def add(self, window_loss: torch.Tensor, batches: list[MicroBatch]) -> None:
        self.loss += window_loss
        self.targets += sum(b.targets for b in batches)
        self.real_tokens += sum(b.real_tokens for b in batches)
        self.processed += sum(b.processed_tokens for b in batches)
        self.flops += sum(self.flop_counter.batch(b) for b in batches)

    def totals(self) -> list[float]:
        """[loss sum, target tokens, real tokens, processed tokens (padding included), model FLOPs] over all ranks."""
        return distributed.sum_all([self.loss.item(), self.targets, self.real_tokens, self.processed, self.flops])

    def reset(self) -> None:
        self.loss.zero_()
        self.targets = self.real_tokens = self.processed = 0
        self.flops = 0.0


class Stretch:
    """The loop from the end of one optimizer step to its end (`train(timed_from_step=N)`): what a benchmark
    times after its warm-up, kept in run.json's telemetry as `after_step`."""

    KEYS = ("real_tokens", "processed_tokens", "flops")

    def __init__(self, step: int, seen: dict[str, float], window: list[float], set_aside: float):
        _, _, real, processed, flops = window  # the log window's totals, read back: the device has finished the step
        self.step, self.set_aside, self.started = step, set_aside, time.perf_counter()
        self.start = dict(zip(self.KEYS, (seen["real_tokens"] + real, seen["processed_tokens"] + processed,
                                          seen["flops"] + flops)))

    def summary(self, step: int, seen: dict[str, float], ended: float, set_aside: float, peak_flops: float | None,
                world_size: int) -> dict[str, float]:
        """Its figures at the loop's end (`seen` as the last logging step left it), validation and saves left out."""
        seconds = ended - self.started - (set_aside - self.set_aside)
        real, processed, flops = (seen[key] - self.start[key] for key in self.KEYS)
        return {"from_step": self.step, "steps": step - self.step, "seconds": seconds, "real_tokens": real,
                "processed_tokens": processed, "tokens_per_second": real / seconds,
                "processed_tokens_per_second": processed / seconds, "padding_efficiency": real / max(processed, 1),
                **model_flops(flops, seconds, peak_flops, world_size)}
