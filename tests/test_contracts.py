"""The library internals dsum relies on, each pinned: a transformers, Accelerate or torch release that
moves one fails here, naming the dsum code that needs it, before a run fails for it. `make test-latest`
runs this file (marked `contracts`) with the newest releases."""

from __future__ import annotations

import inspect

import pytest
import torch

pytestmark = pytest.mark.contracts


def test_accelerate_counts_micro_steps_in_accelerator_step():
    """dsum/train.py sets `accelerator.step` so that a short last window (fewer micro-batches than
    train.gradient_accumulation_steps) still ends with a synchronised optimizer step: Accelerate's
    `accumulate()` syncs when that counter reaches a multiple of the accumulation steps."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=4)
    model = accelerator.prepare(torch.nn.Linear(2, 2))
    synced = []
    accelerator.step = 4 - 2  # a window of two micro-batches
    for _ in range(2):
        with accelerator.accumulate(model):
            synced.append(accelerator.sync_gradients)
    assert synced == [False, True], ("Accelerate no longer decides accumulate()'s sync by Accelerator.step; "
                                     "dsum/train.py's short last windows need another way to sync")


def test_transformers_dynamic_cache_layers_are_what_the_growing_cache_extends():
    """dsum/cpu_speed.py's GrowingLayer replaces DynamicLayer.update and relies on its `keys`, `values`,
    `is_initialized` and `lazy_initialization`, and on a DynamicCache's `layers` list."""
    from transformers import LlamaConfig
    from transformers.cache_utils import DynamicCache, DynamicLayer

    cache = DynamicCache(config=LlamaConfig(num_hidden_layers=2, hidden_size=16, num_attention_heads=2))
    assert [type(layer) for layer in cache.layers] == [DynamicLayer, DynamicLayer], (
        "DynamicCache(config=...) no longer makes one DynamicLayer a layer; see dsum/cpu_speed.py growing_cache")
    layer = DynamicLayer()
    assert not layer.is_initialized and callable(layer.lazy_initialization), (
        "DynamicLayer lost is_initialized / lazy_initialization; see dsum/cpu_speed.py GrowingLayer")
    key, value = torch.ones(1, 2, 3, 4), torch.zeros(1, 2, 3, 4)
    keys, values = layer.update(key, value)
    assert keys is layer.keys and values is layer.values and keys.shape == (1, 2, 3, 4), (
        "DynamicLayer.update no longer keeps and returns .keys and .values; see dsum/cpu_speed.py GrowingLayer")


def test_transformers_compiles_generation_off_cuda_only_when_asked_by_compile_all_devices():
    """dsum/generate.py sets CompileConfig._compile_all_devices so that eval.compile compiles the decoding
    step on a CPU too; transformers compiles only on CUDA-like devices otherwise."""
    from transformers import CompileConfig
    from transformers.generation.utils import GenerationMixin

    assert hasattr(CompileConfig(), "_compile_all_devices"), (
        "transformers' CompileConfig lost _compile_all_devices; see dsum/generate.py cache_kwargs")
    assert "_compile_all_devices" in inspect.getsource(GenerationMixin), (
        "transformers' generate no longer reads _compile_all_devices; see dsum/generate.py cache_kwargs")


@pytest.mark.parametrize("name", ["T5ForConditionalGeneration", "LlamaForCausalLM"])
def test_transformers_marks_static_cache_support_with_can_compile_fullgraph(name):
    """dsum/generate.py check_generation refuses eval.cache: static for a model without this mark."""
    import transformers

    assert getattr(getattr(transformers, name), "_can_compile_fullgraph", None) is True, (
        f"{name}._can_compile_fullgraph is gone; see dsum/generate.py check_generation")


def test_transformers_attention_is_chosen_through_the_config_and_set_attn_implementation():
    """dsum/cpu_dropout.py and dsum/modeling.py read `config._attn_implementation` and switch attention
    with `set_attn_implementation`, to a function registered with AttentionInterface."""
    from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=1, hidden_size=16, intermediate_size=32,
                                         num_attention_heads=2, vocab_size=32))
    assert model.config._attn_implementation == "sdpa", "config._attn_implementation no longer names the attention"
    AttentionInterface.register("dsum_contract", sdpa_attention_forward)
    model.set_attn_implementation("dsum_contract")
    assert model.config._attn_implementation == "dsum_contract", (
        "set_attn_implementation no longer takes a registered attention; see dsum/cpu_dropout.py")


def test_generate_takes_a_kv_cache_by_the_name_dsum_gives_it_without_a_warning():
    """dsum/generate.py hands `generate` its own KV cache (cpu_speed.growing_cache) under `cache_argument()`."""
    import warnings

    from transformers import LlamaConfig, LlamaForCausalLM

    from dsum import cpu_speed
    from dsum.generate import cache_argument

    model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=1, hidden_size=16, intermediate_size=32,
                                         num_attention_heads=2, vocab_size=32, pad_token_id=0)).eval()
    cache = cpu_speed.growing_cache(model, "cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        model.generate(torch.ones(1, 3, dtype=torch.long), max_new_tokens=2, do_sample=False,
                       **{cache_argument(): cache})
    assert cache.get_seq_length() == 4, (f"generate ignored the cache given as {cache_argument()!r}; see "
                                         "dsum/generate.py cache_argument")


def test_accelerate_state_can_be_reset_between_the_bench_s_ways():
    """dsum/bench/harness.py fresh_state resets Accelerate's process-wide state before each way, as if each ran
    in a process of its own: Accelerate keeps the first Accelerator's settings and refuses others."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    Accelerator(cpu=True, gradient_accumulation_steps=4)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    assert Accelerator(cpu=True, mixed_precision="no").gradient_accumulation_steps == 1, (
        "Accelerate's _reset_state no longer resets its state; see dsum/bench/harness.py fresh_state")


def test_accelerate_keeps_the_fsdp_state_dsum_sets_on_a_cpu():
    """dsum/distributed.py configure_fsdp turns FSDP back on where Accelerate drops it (on a CPU) by setting the
    process state's and the Accelerator state's distributed_type and the latter's fsdp_plugin: Accelerate must
    read FSDP2 from them, and every AcceleratorState made later (Accelerate makes some) must keep them."""
    from accelerate import Accelerator, PartialState
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    accelerator = Accelerator(cpu=True)
    accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(fsdp_version=2)
    PartialState().distributed_type = accelerator.state.distributed_type = DistributedType.FSDP
    AcceleratorState()
    assert accelerator.distributed_type == DistributedType.FSDP and accelerator.is_fsdp2, (
        "Accelerate no longer takes FSDP2 from its state's distributed_type and fsdp_plugin; see dsum/distributed.py "
        "configure_fsdp")


def test_bitsandbytes_repacks_4bit_weights_for_the_cpu_only_where_its_flag_allows():
    """dsum/modeling.py keep_4bit_layout clears Linear4bit.support_avx512bf16_for_cpu so that a validation does not
    repack a model's 4-bit weights in the middle of training."""
    import bitsandbytes as bnb

    assert hasattr(bnb.nn.Linear4bit(4, 4), "support_avx512bf16_for_cpu"), (
        "bitsandbytes' Linear4bit lost support_avx512bf16_for_cpu; see dsum/modeling.py keep_4bit_layout")
    forward = inspect.getsource(bnb.nn.Linear4bit.forward)
    assert "self.support_avx512bf16_for_cpu" in forward and "not self.training" in forward, (
        "Linear4bit.forward repacks its weight under other conditions; see dsum/modeling.py keep_4bit_layout")


def test_bitsandbytes_warns_of_the_kernel_hub_where_dsum_filters_it():
    """dsum/cli.py UNSAID drops, by logger and by how it begins, the warning bitsandbytes logs when it cannot
    fetch its optional CPU kernel (offline): a message or module renamed would reach the user again."""
    import importlib
    import inspect
    import logging

    from dsum.cli import UNSAID

    name, unsaid = next((name, unsaid) for name, unsaid in UNSAID if name.startswith("bitsandbytes"))
    module = importlib.import_module(name)
    assert getattr(module, "logger", None) is logging.getLogger(name), f"{name} no longer logs on its own logger"
    assert unsaid.start in inspect.getsource(module), (
        f"{name} no longer warns {unsaid.start!r}; see dsum/cli.py UNSAID")
