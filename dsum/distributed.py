"""The true process group: rank, world size, barriers and sums across every training process.

Accelerate's own state is not always the truth: under DeepSpeed on a CPU it reports one process while
DeepSpeed runs several. Everything that shards data, counts tokens or writes files asks here, and
here asks torch.distributed (or the launcher's environment before it is initialised).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.distributed as dist


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return dist.get_rank() if initialized() else int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if initialized():
        dist.barrier()


@contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (to build and cache something); the others then run it from cache."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def process_group_kwargs() -> list:
    """Accelerate's kwargs_handlers: on a CPU it picks no backend for DeepSpeed and believes it runs
    alone, so name gloo, the one there is."""
    from accelerate.utils import InitProcessGroupKwargs

    deepspeed_on_cpu = (os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true" and not torch.cuda.is_available()
                        and int(os.environ.get("WORLD_SIZE", "1")) > 1)
    return [InitProcessGroupKwargs(backend="gloo")] if deepspeed_on_cpu else []


def _device() -> torch.device:
    if initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def sum_all(values: list[float]) -> list[float]:
    """Element-wise sums over all processes, in float64 so token counts stay exact."""
    tensor = torch.tensor(values, dtype=torch.float64, device=_device())
    if initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def min_all(value: float) -> float:
    """The smallest value over all processes."""
    tensor = torch.tensor([value], dtype=torch.float64, device=_device())
    if initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return tensor.item()


def gather_objects(obj: Any) -> list[Any]:
    """Every process's object, in rank order, on every process."""
    if not initialized():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def zero3(accelerator) -> bool:
    """Whether DeepSpeed shards the weights (ZeRO-3), so every rank must join every forward pass."""
    return getattr(accelerator.state.deepspeed_plugin, "zero_stage", 0) == 3
