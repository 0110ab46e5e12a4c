"""dsum's training loop against transformers' Seq2SeqTrainer (T5) and Trainer (Llama): on the same tiny
random-init models, the same examples in the same order, fp32 and no dropout, the losses of 30 optimizer
steps and the final weights agree within 1e-5, fully fine-tuned and with LoRA, in 4 micro-batches of 2 or
one batch of 8. Seq2SeqTrainer's own T5 loss, a mean per micro-batch, is shown to train otherwise."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import reset_accelerate_state, tiny
from dsum.config import Recipe

STEPS = 30
TOLERANCE = 1e-5
# (per-device batch size, gradient accumulation steps): 8 examples an optimizer step either way.
LAYOUTS = {"accumulated": (2, 4), "one-batch": (8, 1)}

T5 = ("model.architecture={model_type: t5, d_model: 32, d_ff: 64, d_kv: 16, num_heads: 2, num_layers: 2, "
      "num_decoder_layers: 2, relative_attention_num_buckets: 8, dropout_rate: 0.0, feed_forward_proj: gated-gelu, "
      "tie_word_embeddings: true}")
LLAMA = ("model.architecture={model_type: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, "
         "num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 256, initializer_range: 0.1, "
         "tie_word_embeddings: false}")
# Summaries of 13 to 28 tokens, so that micro-batches hold different numbers of target tokens; dialogues cut
# at 128 tokens, so that Llama's prompts differ in length too. 64 examples: 30 steps of 8 reshuffle 3 times.
# Settings off their defaults (betas, epsilon, weight decay, a warm-up) so that each has to reach the
# optimizer and the schedule on both sides, and a clipping norm that some steps' gradients pass and some not.
COMMON = ("tokenizer.vocab_size=1000", "tokenizer.max_source_length=128", "tokenizer.max_target_length=32",
          "data.synthetic.train_size=64", f"train.max_steps={STEPS}", "train.warmup_steps=3",
          "train.weight_decay=0.01", "train.adam_beta2=0.98", "train.adam_epsilon=1e-6")
CASES = {
    "t5-full": (T5, "train.lr_scheduler=linear", "train.learning_rate=1e-3", "train.max_grad_norm=1.5"),
    "t5-lora": (T5, "train.lr_scheduler=cosine", "train.learning_rate=1e-2", "train.max_grad_norm=0.8",
                "adapter.target_modules=[q,v]"),
    "llama-full": (LLAMA, "train.lr_scheduler=linear", "train.learning_rate=1e-3", "train.max_grad_norm=1.5"),
    "llama-lora": (LLAMA, "train.lr_scheduler=cosine", "train.learning_rate=1e-2", "train.max_grad_norm=0.8"),
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """A tiny model's matrices are too small to share between threads; on a machine whose other core is
    busy, OpenMP's second thread waits for it, and a step takes many times as long."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclass
class Run:
    losses: list[float]  # per optimizer step: the mean over the target tokens of its accumulation window
    learning_rates: list[float]  # per optimizer step: the rate its update took
    grad_norms: list[float]  # per optimizer step, before clipping
    weights: dict[str, torch.Tensor]  # what trained: the whole model, or the adapter
    targets: list[int] | None = None  # target tokens of each example, in the order trained on


@dataclass
class DsumRun(Run):
    recipe: Recipe | None = None
    initial: torch.nn.Module | None = None  # the model dsum's loop started from, as it was loaded


def train_dsum(name: str, out: Path, batch: int, accumulation: int) -> DsumRun:
    """The case trained by `dsum.train.train`, keeping a copy of the model its loop starts from (LoRA's A
    matrices start random, and the reference trainer must start from the same)."""
    import dsum.train as loop

    recipe = tiny(name, out, *COMMON, *CASES[name], f"train.per_device_batch_size={batch}",
                  f"train.gradient_accumulation_steps={accumulation}")
    loaded = []
    load_model = loop.load_model

    def keeping_a_copy(*args, **kwargs):
        model = load_model(*args, **kwargs)
        loaded.append(copy.deepcopy(model))
        return model

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop, "load_model", keeping_a_copy)
        final = loop.train(recipe)
    reset_accelerate_state()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    adapter = final / "adapter_model.safetensors"
    weights = load_file(adapter if adapter.exists() else final / "model.safetensors")
    return DsumRun([r["loss"] for r in rows], [r["learning_rate"] for r in rows], [r["grad_norm"] for r in rows],
                   weights, recipe=recipe, initial=loaded[0])


def reference_features(recipe, tokenizer) -> list[dict[str, list[int]]]:
    """The training examples as the reference trainers take them, built here from dsum's prompt and summary
    token ids alone, not from its features: T5 reads the prompt and predicts the summary; Llama reads both
    and predicts the summary alone (the prompt's labels are -100). Padding is the collator's
    (transformers' DataCollatorForSeq2Seq, which pads labels with -100)."""
    from dsum.data import load_split
    from dsum.features import Featurizer

    examples = load_split(recipe.data, recipe.data.train_split)
    featurizer = Featurizer(recipe, tokenizer)
    prompts = featurizer.prompts_ids([e.dialogue for e in examples])
    summaries = featurizer.summaries_ids([e.references[0] for e in examples])
    if recipe.model.family == "seq2seq":
        return [{"input_ids": p, "labels": s} for p, s in zip(prompts, summaries)]
    return [{"input_ids": p + s, "labels": [-100] * len(p) + s} for p, s in zip(prompts, summaries)]


def dsum_order(recipe, num_examples: int) -> list[int]:
    """The examples of every optimizer step, in the order dsum's loop trains on them (its batch plan: one
    shuffle per epoch); the reference trainer reads them in this order, unshuffled."""
    from dsum.batching import training_plan

    plan = training_plan(recipe.train, [1] * num_examples, world_size=1, rank=0)
    order = []
    for step in range(STEPS):
        epoch, index = plan.locate(step)
        order += [i for micro in plan.windows(epoch)[index] for i in micro]
    return order


def per_token_loss(outputs, labels, num_items_in_batch):
    """The summed cross-entropy of a micro-batch over the target tokens of its whole accumulation window
    (`num_items_in_batch`, which the Trainer counts before the window's first forward): the window's
    per-token mean, as dsum takes it."""
    logits = outputs.logits.float()
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100,
                           reduction="sum") / num_items_in_batch


def train_reference(start: DsumRun, out: Path, batch: int, accumulation: int, *, per_token: bool = True) -> Run:
    """The run `start` was, in transformers' Seq2SeqTrainer (T5) or Trainer (Llama).

    The loss: Llama's own (`ForCausalLMLoss`) already divides by the Trainer's `num_items_in_batch`, the
    target tokens of the accumulation window, so the stock Trainer trains on the per-token mean. T5's
    forward takes `**kwargs`, so the Trainer takes its loss as normalised likewise and does not divide it
    by the accumulation steps, but T5's loss is the mean over its micro-batch alone: the Trainer is given
    `per_token_loss` as `compute_loss_func` (`per_token=False` keeps T5's own, for
    `test_the_reference_default_weighs_micro_batches_alike`). `average_tokens_across_devices` (on by
    default) changes nothing in one process.

    What is compared: with logging_steps 1 the Trainer logs the sum, over the window's micro-batches, of
    the losses it backpropagated, each summed over its tokens and divided by the window's: the window's
    per-token mean, which is what dsum logs (`metrics.jsonl`'s `loss`), though kept in fp32 (5e-7 at a
    loss of 7). Its `learning_rate` is the rate the step's update took, as dsum's; its `grad_norm` is
    Accelerate's norm before clipping, as dsum's.
    """
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    from transformers import (AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer, DataCollatorForSeq2Seq,
                              PrinterCallback, Seq2SeqTrainer, Seq2SeqTrainingArguments, Trainer,
                              TrainingArguments)

    recipe, cfg = start.recipe, start.recipe.train
    run_dir = Path(recipe.output_dir)
    seq2seq = recipe.model.family == "seq2seq"
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "tokenizer")  # the one dsum trained for the run
    base = (AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM).from_pretrained(run_dir / "base")
    model = base
    if recipe.adapter.method == "lora":
        a = recipe.adapter
        model = get_peft_model(base, LoraConfig(task_type="SEQ_2_SEQ_LM" if seq2seq else "CAUSAL_LM", r=a.r,
                                                lora_alpha=a.alpha, lora_dropout=a.dropout,
                                                target_modules=a.target_modules))
        # LoRA's A matrices start random: from the values dsum's started from.
        set_peft_model_state_dict(model, get_peft_model_state_dict(start.initial))
    features = reference_features(recipe, tokenizer)
    train_set = [features[i] for i in dsum_order(recipe, len(features))]

    class Reference(Seq2SeqTrainer if seq2seq else Trainer):
        def get_decay_parameter_names(self, model):
            # dsum decays every matrix and no vector (biases, norms); transformers decays all but what is
            # named a bias or a norm. The two differ on T5's relative_attention_bias alone, a matrix of
            # position biases that dsum decays and transformers does not: dsum's rule, here.
            ours = [n for n, p in model.named_parameters() if p.ndim >= 2]
            theirs = set(super().get_decay_parameter_names(model)) & dict(model.named_parameters()).keys()
            differ = set(ours) ^ theirs  # among the parameters named once (tied matrices go by their first name)
            assert all("relative_attention_bias" in n for n in differ) and bool(differ) == seq2seq, differ
            return ours

    args = (Seq2SeqTrainingArguments if seq2seq else TrainingArguments)(
        output_dir=str(out), use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True,
        logging_steps=1, max_steps=STEPS, per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation, train_sampling_strategy="sequential",
        remove_unused_columns=False, dataloader_pin_memory=False,
        optim="adamw_torch_fused",  # torch's fused AdamW, dsum's on a CPU
        learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay, adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2, adam_epsilon=cfg.adam_epsilon, max_grad_norm=cfg.max_grad_norm,
        lr_scheduler_type=cfg.lr_scheduler, warmup_steps=cfg.warmup_steps, label_smoothing_factor=0.0,
        seed=cfg.seed)
    # For T5 the collator also makes the decoder's inputs from the labels (the model's own shift right),
    # since a `compute_loss_func` takes the labels out of what the model is given.
    collator = DataCollatorForSeq2Seq(tokenizer, model=base if seq2seq else None, label_pad_token_id=-100)
    trainer = Reference(model=model, args=args, train_dataset=train_set, data_collator=collator,
                        compute_loss_func=per_token_loss if seq2seq and per_token else None)
    trainer.remove_callback(PrinterCallback)  # its log lines, one a step
    trainer.train()
    reset_accelerate_state()
    logged = [r for r in trainer.state.log_history if "loss" in r]
    assert [r["step"] for r in logged] == list(range(1, STEPS + 1))
    if recipe.adapter.method == "lora":
        weights = get_peft_model_state_dict(model)
    else:
        weights = model.state_dict()
    return Run([r["loss"] for r in logged], [r["learning_rate"] for r in logged], [r["grad_norm"] for r in logged],
               {k: v.detach().clone() for k, v in weights.items()},
               targets=[sum(t != -100 for t in f["labels"][0 if seq2seq else 1:]) for f in train_set])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Each run trained once, when a test first asks for it."""
    done: dict[tuple, Run] = {}

    def get(name: str, layout: str, trainer: str = "dsum") -> Run:
        key = (name, layout, trainer)
        if key not in done:
            batch, accumulation = LAYOUTS[layout]
            out = tmp_path_factory.mktemp(f"{name}-{layout}-{trainer}")
            if trainer == "dsum":
                done[key] = train_dsum(name, out, batch, accumulation)
            else:  # "reference", or "default": the reference trainer with its own handling of the loss
                done[key] = train_reference(get(name, layout), out, batch, accumulation,
                                            per_token=trainer == "reference")
        return done[key]

    return get


def max_weight_difference(a: Run, b: Run) -> float:
    """The largest difference of any weight of `a`'s; dsum's file holds a tied matrix once, under one of the
    names the model's state dict gives it."""
    shared = a.weights.keys() & b.weights.keys()
    assert shared and shared == a.weights.keys(), sorted(a.weights.keys() - b.weights.keys())
    return max((a.weights[k] - b.weights[k]).abs().max().item() for k in shared)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", CASES)
def test_dsum_trains_as_the_reference_trainer(runs, name, layout):
    """Step by step: the loss, the learning rate the update took, the gradient norm before clipping; then
    the weights that trained."""
    ours, theirs = runs(name, layout), runs(name, layout, "reference")
    assert ours.losses == pytest.approx(theirs.losses, abs=TOLERANCE)
    assert ours.learning_rates == pytest.approx(theirs.learning_rates, rel=0, abs=1e-12)
    assert ours.grad_norms == pytest.approx(theirs.grad_norms, abs=TOLERANCE)
    assert max_weight_difference(ours, theirs) < TOLERANCE
    assert ours.losses[-1] < ours.losses[0] - 0.5  # it learned: the runs compared are not still at the start
    clipped = sum(norm > ours.recipe.train.max_grad_norm for norm in ours.grad_norms)
    assert 0 < clipped < STEPS  # clipping both cut some steps and left some alone


@pytest.mark.parametrize("name", CASES)
def test_accumulated_micro_batches_train_as_one_batch(runs, name):
    """4 micro-batches of 2 and one batch of 8, in dsum and in the reference trainer."""
    for trainer in ("dsum", "reference"):
        accumulated, whole = runs(name, "accumulated", trainer), runs(name, "one-batch", trainer)
        assert accumulated.losses == pytest.approx(whole.losses, abs=TOLERANCE)
        assert max_weight_difference(accumulated, whole) < TOLERANCE


def test_the_reference_default_weighs_micro_batches_alike(runs):
    """Seq2SeqTrainer with T5's own loss (no `compute_loss_func`): the mean over each micro-batch's own target
    tokens, and, T5's forward taking **kwargs, not divided by the accumulation steps. A batch of 8 is one
    micro-batch, and trains as dsum's; 4 micro-batches of 2 that hold different numbers of target tokens
    count alike whatever their size, 4 times over, and train otherwise."""
    ours, default = runs("t5-full", "accumulated"), runs("t5-full", "accumulated", "default")
    micro = [sum(default.targets[i : i + 2]) for i in range(0, len(default.targets), 2)]
    windows = [micro[i : i + 4] for i in range(0, len(micro), 4)]
    assert all(len(set(w)) > 1 for w in windows), windows  # the case where the weighting matters
    # The first step starts from the same weights on both sides. The default logs the sum of the 4 means, a
    # quarter of which is their mean, off dsum's per-token mean by how unequal the micro-batches are; its
    # gradient is the sum of theirs, some 4 times dsum's.
    assert abs(default.losses[0] / 4 - ours.losses[0]) > 10 * TOLERANCE
    assert default.grad_norms[0] == pytest.approx(4 * ours.grad_norms[0], rel=0.05)
    assert max_weight_difference(ours, default) > 10 * TOLERANCE
    one_batch, default_one_batch = runs("t5-full", "one-batch"), runs("t5-full", "one-batch", "default")
    assert one_batch.losses == pytest.approx(default_one_batch.losses, abs=TOLERANCE)
    assert max_weight_difference(one_batch, default_one_batch) < TOLERANCE
