"""The true process group (rank, world size, barriers and sums across every training process), which all that
shards data, counts tokens or writes files asks, not Accelerate, and the sharding of the weights (ZeRO-3, FSDP).
Accelerate's own state is not always the truth: on a CPU it believes DeepSpeed alone, and trains FSDP as DDP."""

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


def fsdp(accelerator) -> bool:
    """Whether the launch is FSDP's, which shards the weights of the model that `prepare` is given."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def shards_weights(accelerator) -> bool:
    """Whether training shards the weights across ranks (ZeRO-3, FSDP), so every rank must join every forward pass."""
    return zero3(accelerator) or fsdp(accelerator)


def fsdp_sharded(model) -> bool:
    """Whether FSDP2 has sharded this model; an evaluation's model under an FSDP launch is left whole."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def synced_gpus(accelerator, model) -> bool:
    """generate's `synced_gpus` for this model: every rank must join every forward pass where its weights are
    sharded, by ZeRO-3 or by FSDP."""
    return zero3(accelerator) or fsdp_sharded(model)


@contextmanager
def whole_root(model) -> Iterator[None]:
    """The weights of an FSDP2 model's root unit gathered for the length of the block. FSDP gathers a unit's
    weights in that unit's forward, but generation calls T5's encoder, and the model inside a LoRA wrapper,
    apart from the root module: after a backward, the root's own weights (T5's final norms, say) would stay
    sharded there. Nothing for a model FSDP has not sharded."""
    if not fsdp_sharded(model):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


def fit_for_fsdp(accelerator, model) -> None:
    """Under FSDP, before `prepare`: every tied weight in one FSDP unit. T5 embeds its encoder's and decoder's
    tokens through Embedding modules of their own that share the input embedding's weight; Accelerate puts
    the input embedding (and the output head tied to it) in a unit and leaves those two to the root unit, and
    torch refuses a weight that two units hold. They become the input embedding module itself, as T5 was
    built before transformers 5: the weights, their names and the saved files are the same."""
    if not fsdp(accelerator):
        return
    import torch

    embedding = model.get_input_embeddings()
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if module is not embedding and isinstance(module, torch.nn.Embedding) and module.weight is embedding.weight:
            model.set_submodule(name, embedding)


def configure_fsdp(accelerator) -> None:
    """The one place FSDP's plugin is set, right after the Accelerator is built. Accelerate takes an FSDP
    launch only on a GPU-like device: with ACCELERATE_USE_CPU=true it drops the plugin and trains the ranks
    as DDP. torch's FSDP2 runs on a CPU over gloo, so there FSDP is turned back on with the plugin that
    the launch's settings make (Accelerate's own; its state's two fields are pinned in tests/test_contracts.py)."""
    from accelerate import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import CPUOffloadPolicy

    state = accelerator.state
    asked = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if not (asked and state.distributed_type == DistributedType.MULTI_CPU):
        return
    plugin = FullyShardedDataParallelPlugin()
    if isinstance(plugin.cpu_offload, CPUOffloadPolicy):  # already on the host: no device to pin its memory for
        plugin.cpu_offload = CPUOffloadPolicy(pin_memory=False)
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.fsdp_plugin = plugin
    # Every AcceleratorState() made later copies the process state's type over its own: both are set.
    PartialState().distributed_type = state.distributed_type = DistributedType.FSDP


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
