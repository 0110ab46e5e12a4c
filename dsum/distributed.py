"""The true process group (rank, world size, barriers and sums across every training process), which all that
shards data, counts tokens or writes files asks, not Accelerate. Accelerate's own state is not always the truth:
under DeepSpeed on a CPU it reports one process while DeepSpeed runs several."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Any, Iterator


def process_group():
    """torch.distributed where a process group is running, else None, and then `world_size` and `rank` read the
    launcher's environment. torch is imported here, not at the top: `dsum submit` imports this module (through
    run_info) and needs no torch, and no group can run before torch is imported."""
    if "torch" not in sys.modules:
        return None
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def initialized() -> bool:
    return process_group() is not None


def world_size() -> int:
    dist = process_group()
    return dist.get_world_size() if dist else int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    dist = process_group()
    return dist.get_rank() if dist else int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist := process_group():
        dist.barrier()


def end() -> None:
    """Close the process group at the end of a command, as torch asks of a process before it exits."""
    if dist := process_group():
        _HOST_GROUPS.clear()
        dist.destroy_process_group()


@contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (to build and cache something); the others then run it from cache."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def tell_deepspeed_the_device() -> None:
    """Without CUDA, tell DeepSpeed that it runs on the CPU, before it is first imported (else it warns
    that it fell back to the CPU). Where the user set DS_ACCELERATOR, theirs stands."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def process_group_kwargs() -> list:
    """Accelerate's kwargs_handlers, asked for just before the Accelerator is built. On a CPU, Accelerate
    picks no backend for DeepSpeed and believes it runs alone: it is given gloo, the one there is."""
    import torch
    from accelerate.utils import InitProcessGroupKwargs

    tell_deepspeed_the_device()
    deepspeed_on_cpu = (os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true" and not torch.cuda.is_available()
                        and int(os.environ.get("WORLD_SIZE", "1")) > 1)
    return [InitProcessGroupKwargs(backend="gloo")] if deepspeed_on_cpu else []


def _reduce(values: list[float], op: str) -> list[float]:
    """`op` (a torch.distributed.ReduceOp name) over all processes, element-wise, in float64 so token
    counts stay exact. The values are the host's, and so is the reduction: over gloo (`host_group`),
    never through a GPU, whose queue a read of the result would wait on."""
    import torch

    dist = process_group()
    if dist is None:
        return [float(v) for v in values]
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor, op=getattr(dist.ReduceOp, op), group=host_group())
    return tensor.tolist()


_HOST_GROUPS: dict[Any, Any] = {}


def host_group():
    """A gloo group of every process, for values that live on the host: the default group where it is
    gloo already, else one made once per default group (every process makes it at its first reduction,
    and every process takes part in every reduction, so all make it together)."""
    dist = process_group()
    if dist.get_backend() == "gloo":
        return None
    world = dist.group.WORLD
    if world not in _HOST_GROUPS:
        _HOST_GROUPS[world] = dist.new_group(backend="gloo")
    return _HOST_GROUPS[world]


def sum_all(values: list[float]) -> list[float]:
    """Element-wise sums over all processes."""
    return _reduce(values, "SUM")


def min_all(value: float) -> float:
    """The smallest value over all processes."""
    return _reduce([value], "MIN")[0]


def gather_objects(obj: Any) -> list[Any]:
    """Every process's object, in rank order, on every process."""
    dist = process_group()
    if dist is None:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def zero3(accelerator) -> bool:
    """Whether DeepSpeed shards the weights (ZeRO-3), so every rank must join every forward pass."""
    return getattr(accelerator.state.deepspeed_plugin, "zero_stage", 0) == 3


def configure_deepspeed(accelerator, micro_batch: int, accumulation: int = 1, clipping: float | None = None) -> None:
    """The one place DeepSpeed's config is filled in, before `prepare`: the micro-batch, accumulation and
    clipping of training, or an evaluation's batch (dsum shards the data itself). Nothing without DeepSpeed."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return
    ds = plugin.deepspeed_config
    ds["train_micro_batch_size_per_gpu"] = micro_batch
    ds["gradient_accumulation_steps"] = accumulation
    ds["train_batch_size"] = micro_batch * accumulation * world_size()
    if clipping is not None:
        ds["gradient_clipping"] = clipping
