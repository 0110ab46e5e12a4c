"""dsum's CPU dropout: PyTorch's distribution and gradients, drawn from the seeded generator; with the
masks taken out, dsum's attention computes what transformers' does (T5 with padding, a causal Llama
with grouped keys and values); and the model is given back as it was."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from dsum import cpu_dropout
from dsum.cpu_dropout import FastCpuDropout, fast_dropout


def test_the_mask_keeps_1_minus_p_scales_the_kept_and_the_gradient_follows_it():
    torch.manual_seed(0)
    x = torch.rand(1_000_000, dtype=torch.float64) + 0.5
    x.requires_grad_(True)
    y = fast_dropout(x, 0.3)
    kept = y != 0
    assert kept.double().mean().item() == pytest.approx(0.7, abs=0.002)  # 1e6 draws: 4.6 standard deviations
    torch.testing.assert_close(y[kept], x[kept] / 0.7)
    y.sum().backward()
    torch.testing.assert_close(x.grad, kept.double() / 0.7)
    # Seeded like PyTorch's own: the same seed, the same mask.
    torch.manual_seed(1)
    first = fast_dropout(torch.ones(1000), 0.5)
    torch.manual_seed(1)
    assert torch.equal(fast_dropout(torch.ones(1000), 0.5), first)
    assert not torch.equal(fast_dropout(torch.ones(1000), 0.5), first)
    # Nothing is drawn outside training or at p = 0; half precision stays half precision.
    ones = torch.ones(8)
    assert fast_dropout(ones, 0.5, training=False) is ones and fast_dropout(ones, 0.0) is ones
    assert fast_dropout(torch.ones(8, dtype=torch.bfloat16), 0.1).dtype == torch.bfloat16


def t5(dropout_rate: float = 0.1):
    from transformers import T5Config, T5ForConditionalGeneration

    return T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=32, d_ff=48, d_kv=8, num_heads=4, num_layers=2,
                                               num_decoder_layers=2, dropout_rate=dropout_rate, decoder_start_token_id=0))


def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, attention_dropout=0.1))


def batch(family: str) -> dict[str, torch.Tensor]:
    ids = torch.randint(2, 64, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # one row padded at the end, one at the start
    mask[2, :3] = 0
    if family == "seq2seq":
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(2, 64, (3, 5))}
    labels = ids.masked_fill(mask == 0, -100)
    labels[2, 3] = -100  # predicted from a padding position: as in dsum, the prompt's first token is no target
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("build, family", [(t5, "seq2seq"), (llama, "causal")])
def test_without_its_masks_dsum_attention_computes_what_transformers_does(build, family, monkeypatch):
    torch.manual_seed(0)
    reference = build().eval()  # transformers' sdpa, no dropout
    model = copy.deepcopy(reference).train()
    switched = FastCpuDropout(model)
    assert model.config._attn_implementation == cpu_dropout.ATTENTION and switched.attention == "sdpa"
    # Masks of ones: what is left is the attention's math. Had any call gone to PyTorch's sdpa, which
    # draws its own dropout in training, the outputs would differ.
    monkeypatch.setattr(cpu_dropout, "fast_dropout", lambda x, p, training=True: x)
    inputs = batch(family)
    ours, theirs = model(**inputs), reference(**inputs)
    # Where the query is a padding position, the two masks differ and so does what it attends to; no
    # real position or loss term reads it.
    real = inputs["attention_mask"].bool() if family == "causal" else torch.ones(ours.logits.shape[:2], dtype=torch.bool)
    torch.testing.assert_close(ours.logits[real], theirs.logits[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.loss, theirs.loss)
    ours.loss.backward()
    theirs.loss.backward()
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_the_model_is_given_back_as_it_was():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(t5(), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.2, target_modules=["q", "v"]))
    count = sum(type(m) is nn.Dropout for m in model.modules())
    switched = FastCpuDropout(model)
    assert len(switched.modules) == count > 0  # T5's dropouts and LoRA's
    assert all(type(m) is not nn.Dropout for m in model.modules())
    assert model.base_model.model.decoder.config._attn_implementation == cpu_dropout.ATTENTION
    switched.remove()
    assert sum(type(m) is nn.Dropout for m in model.modules()) == count
    assert model.base_model.model.config._attn_implementation == "sdpa"
    assert model.base_model.model.decoder.config._attn_implementation == "sdpa"


def test_a_model_without_attention_dropout_keeps_its_attention():
    model = llama()
    model.config.attention_dropout = 0.0
    switched = FastCpuDropout(model)
    assert switched.attention is None and not switched.active
    assert model.config._attn_implementation == "sdpa"


def test_a_model_built_without_dropout_is_left_alone_and_nothing_is_said():
    model = t5(dropout_rate=0.0)
    switched = FastCpuDropout(model)
    assert not switched.modules and not switched.active  # train.py prints its description only when active
    assert all(type(m) is nn.Dropout for m in model.modules() if isinstance(m, nn.Dropout))
    assert model.config._attn_implementation == "sdpa"
