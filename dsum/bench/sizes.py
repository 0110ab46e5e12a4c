"""What the bench runs: its sizes per device, the models and their recipe settings, dsum's speed settings,
and the goals of the three-way comparison. Nothing heavy is imported: `dsum --help` reads it."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

WAYS = ("notebook", "no_trainer", "dsum")


@dataclass(frozen=True)
class Sizes:
    """Everything the bench's duration depends on, per device."""

    train_examples: int | None  # the first N training dialogues, the same for every way (None: all 12,460)
    warmup_steps: int  # optimizer steps every way runs before its clock starts (at least 1)
    train_steps: int  # optimizer steps timed, the same number in every way
    eval_dialogues: int  # the first N test dialogues, in every way
    notebook_rows: int  # flattened rows the notebook way generates one at a time; the rest is extrapolated
    # dsum's generation settings per model family: eval.batch_size (dialogues per generate call) and, for
    # seq2seq, eval.encoder_batch_size. The other ways call `generate` themselves and read neither.
    dsum_generation: dict[str, dict[str, int]]
    max_new_tokens: int  # every way generates this many tokens a row (random weights rarely stop sooner)
    eval_dtype: str  # the weights every way generates with
    # Training and evaluation are timed in rounds, every way in turn in each, so that a slow spell on the
    # machine falls on every way instead of on one. Training: each round trains afresh from the base with
    # its own seed (other batches), the timed steps split between the rounds. Evaluation: the notebook's
    # rows and no_trainer's batches split between the rounds, dsum's whole pass repeated.
    train_rounds: int = 3
    eval_rounds: int = 3
    no_trainer_eval_batch: int = 8  # the example script's default per_device_eval_batch_size
    max_source_length: int = 512  # the notebook's and the script's truncation, and dsum recipes'
    max_target_length: int = 128
    vocab_size: int = 8000  # the tokenizer trained on the training split: DialogSum-like token lengths
    seed: int = 42


# 2 cores, under 10 minutes for everything (5.5 to 7 on a quiet machine): small models, 2,000 training
# dialogues, all 500 test dialogues. T5 generates 128 dialogues a call, its encoder taking 16 at a time
# (faster on 2 cores than 64 in one encoder pass; BENCHMARKS.md, "Earlier measurements").
CPU_SIZES = Sizes(train_examples=2000, warmup_steps=2, train_steps=18, eval_dialogues=500, notebook_rows=128,
                  dsum_generation={"seq2seq": {"batch_size": 128, "encoder_batch_size": 16},
                                   "causal": {"batch_size": 64}},
                  max_new_tokens=32, eval_dtype="float32")
# One GPU: the whole training split and all 500 test dialogues (1,500 flattened rows).
CUDA_SIZES = Sizes(train_examples=None, warmup_steps=3, train_steps=18, eval_dialogues=500, notebook_rows=60,
                   dsum_generation={"seq2seq": {"batch_size": 64}, "causal": {"batch_size": 64}},
                   max_new_tokens=64, eval_dtype="bfloat16")
SIZES = {"cpu": CPU_SIZES, "cuda": CUDA_SIZES}


def train_rounds(sizes: Sizes) -> list[Sizes]:
    """Each training round's sizes: its share of the timed steps (Sizes.train_rounds rounds, fewer when
    there are fewer timed steps) and its own seed, so that the rounds time different batches."""
    rounds = max(1, min(sizes.train_rounds, sizes.train_steps))
    return [replace(sizes, train_steps=len(range(r, sizes.train_steps, rounds)), seed=sizes.seed + r)
            for r in range(rounds)]


def eval_rounds(sizes: Sizes, rows: int) -> int:
    """Sizes.eval_rounds, or fewer where the notebook's timed rows or no_trainer's batches over the `rows`
    flattened rows are fewer."""
    return max(1, min(sizes.eval_rounds, sizes.notebook_rows, rows, -(-rows // sizes.no_trainer_eval_batch)))


@dataclass(frozen=True)
class ModelSpec:
    """A model to bench: a random-init architecture (nothing can be downloaded) and the dsum recipe
    settings every way uses (batch size, accumulation, learning rate, precision, LoRA/QLoRA)."""

    name: str
    architecture: dict[str, Any]  # a transformers config with model_type; without vocab_size, the tokenizer's
    # Inline settings, or a file under the recipes directory (`--recipes`, by default the checkout's
    # recipes/), whose settings `dsum.bench.recipes.load_recipes` reads in its place before anything runs.
    recipe: dict[str, Any] | str
    untied_head: bool = False  # T5 v1.1 / FLAN-T5 keep their LM head apart from the embeddings
    parameters: int | None = None  # as the real checkpoint has them (checked on the meta device in the tests)
    recipe_file: str | None = None  # the file its settings were read from, once read

    @property
    def recipe_source(self) -> str:
        """Where its settings come from, as the results say it."""
        if isinstance(self.recipe, str):
            return self.recipe
        return self.recipe_file or "inline (dsum/bench/sizes.py cpu_recipe)"


def cpu_recipe(family: str) -> dict[str, Any]:
    return {
        "model": {"family": family, "dtype": "float32"},
        "adapter": {"method": "none"},
        "train": {"per_device_batch_size": 8, "gradient_accumulation_steps": 1, "learning_rate": 1e-4,
                  "weight_decay": 0.01, "max_grad_norm": 1.0, "mixed_precision": "no"},
    }


# FLAN-T5's shape (gated GELU, relative attention, untied head) and Llama's, small enough for 2 cores.
CPU_MODELS = (
    ModelSpec("t5", {"model_type": "t5", "d_model": 128, "d_ff": 384, "d_kv": 32, "num_heads": 4, "num_layers": 2,
                     "num_decoder_layers": 2, "feed_forward_proj": "gated-gelu", "dropout_rate": 0.1,
                     "tie_word_embeddings": False},
              cpu_recipe("seq2seq"), untied_head=True),
    ModelSpec("llama", {"model_type": "llama", "hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 2,
                        "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 1024,
                        "tie_word_embeddings": False},
              cpu_recipe("causal")),
)

FLAN_T5_BASE = {"model_type": "t5", "vocab_size": 32128, "d_model": 768, "d_ff": 2048, "d_kv": 64, "num_heads": 12,
                "num_layers": 12, "num_decoder_layers": 12, "feed_forward_proj": "gated-gelu",
                "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128, "dropout_rate": 0.1,
                "layer_norm_epsilon": 1e-6, "tie_word_embeddings": False}
FLAN_T5_LARGE = {**FLAN_T5_BASE, "d_model": 1024, "d_ff": 2816, "num_heads": 16, "num_layers": 24,
                 "num_decoder_layers": 24}
LLAMA_2_7B = {"model_type": "llama", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
              "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
              "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
              "tie_word_embeddings": False}
CUDA_MODELS = (
    ModelSpec("flan-t5-base", FLAN_T5_BASE, "flan-t5-base/full.yaml", untied_head=True, parameters=247_577_856),
    ModelSpec("flan-t5-large", FLAN_T5_LARGE, "flan-t5-large/full.yaml", untied_head=True, parameters=783_150_080),
    ModelSpec("llama-2-7b-lora", LLAMA_2_7B, "llama-2-7b/lora.yaml", parameters=6_738_415_616),
    ModelSpec("llama-2-7b-qlora", LLAMA_2_7B, "llama-2-7b/qlora.yaml", parameters=6_738_415_616),
)
MODELS = {"cpu": CPU_MODELS, "cuda": CUDA_MODELS}

# dsum's speed switches, per model family. TOKEN_BUDGET stands for batch size x the mean example
# length: micro-batches then hold about as many real tokens as the other ways' batches, so dsum is
# measured on the same work per step, not on bigger batches.
TOKEN_BUDGET = "batch size x mean example tokens"
# fast_cpu_dropout is dsum's default, named here so that the results say so; it acts on the CPU only
# (dsum/cpu_dropout.py: the same dropout, its masks drawn faster).
DSUM_SPEED: dict[str, dict[str, Any]] = {
    "seq2seq": {"group_by_length": True, "max_tokens_per_batch": TOKEN_BUDGET, "fast_cpu_dropout": True},
    # Not train.packing: without flash attention (not installed with dsum) the packed row's mask spans
    # the whole row, and attention costs as if it were one sequence. On the CPU, a run with packing here
    # was slower than length grouping (BENCHMARKS.md).
    "causal": {"group_by_length": True, "max_tokens_per_batch": TOKEN_BUDGET, "fast_cpu_dropout": True},
}

# What `--dsum KEY=VALUE` may set in dsum's own way, to compare a setting against its default: dsum's
# speed settings alone, none of which the other ways read, so that the three ways still train on the
# same data for the same steps and generate the same tokens.
DSUM_OPTIONS = ("train.group_by_length", "train.max_tokens_per_batch", "train.packing", "train.fast_cpu_dropout",
                "train.compile", "train.pad_to_multiple_of", "eval.batch_size", "eval.encoder_batch_size", "eval.cache",
                "eval.compile")

# What BENCHMARKS.md promises; reported next to the results, never asserted by the tests.
GOALS = {"train_speedup_vs_notebook": 3.0, "train_speedup_vs_no_trainer": 1.8, "eval_speedup_vs_notebook": 30.0,
         "eval_speedup_vs_no_trainer": 4.0, "padding_efficiency": 0.9}
