"""What every way reads: the DialogSum examples, the tokenizer trained on them, and the random-init base
weights, saved once per architecture; and the model every way generates with."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from dsum.bench.recipes import bench_recipe, recipe_settings
from dsum.bench.sizes import ModelSpec, Sizes
from dsum.config import DataConfig, Recipe, RecipeError, validate_recipe


@dataclass
class BenchData:
    """The examples every way uses, and the tokenizer trained on the training split."""

    directory: Path
    train: list  # the first Sizes.train_examples training examples
    test: list  # the first Sizes.eval_dialogues test dialogues, each with its references
    train_split_size: int
    tokenizer_dir: Path
    mean_dialogue_tokens: float
    mean_summary_tokens: float

    @classmethod
    def load(cls, directory: Path, sizes: Sizes, tokenizer_dir: Path) -> BenchData:
        from dsum.data import load_split

        config = DataConfig(source=str(directory))
        train_split = load_split(config, "train")
        test = load_split(config, "test")[: sizes.eval_dialogues]
        if len(test) < sizes.eval_dialogues:
            raise RecipeError(f"--eval-dialogues: the test split has {len(test)} dialogues, fewer than "
                              f"{sizes.eval_dialogues}")
        tokenizer = train_bench_tokenizer(train_split, sizes, directory, tokenizer_dir)
        train = train_split[: sizes.train_examples]
        dialogues = tokenizer([e.dialogue for e in train], add_special_tokens=False)["input_ids"]
        summaries = tokenizer([e.references[0] for e in train], add_special_tokens=False)["input_ids"]
        return cls(directory, train, test, len(train_split), tokenizer_dir,
                   sum(map(len, dialogues)) / len(train), sum(map(len, summaries)) / len(train))


def train_bench_tokenizer(examples: list, sizes: Sizes, directory: Path, out: Path):
    """dsum's offline BPE tokenizer, trained on the whole training split, saved for every way to load."""
    from transformers import AutoTokenizer

    from dsum.modeling import train_tokenizer

    recipe = validate_recipe({"model": {"family": "seq2seq", "architecture": {"model_type": "t5"}},
                              "tokenizer": {"train": True, "vocab_size": sizes.vocab_size},
                              "data": {"source": str(directory)}, "output_dir": str(out.parent)})
    texts = (text for e in examples for text in (e.dialogue, *e.references))
    train_tokenizer(recipe, texts).save_pretrained(out)
    return AutoTokenizer.from_pretrained(out)


def build_model(spec: ModelSpec, config, *, meta: bool = False, device: str = "cpu", dtype=None):
    """The architecture with random weights; FLAN-T5's separate LM head is given back to it
    (transformers ties a T5 head to the embeddings when it builds one from a config)."""
    import torch

    from dsum.modeling import auto_class

    family = "seq2seq" if config.is_encoder_decoder else "causal"
    with torch.device("meta" if meta else device):
        model = auto_class(family).from_config(config, dtype=dtype)
        if spec.untied_head:
            shared = model.get_input_embeddings().weight
            head = torch.empty_like(shared)
            if not meta:
                head.normal_(mean=0.0, std=config.initializer_factor)  # T5's own init of an untied head
            model.lm_head.weight = torch.nn.Parameter(head)
            model.config.tie_word_embeddings = False
    return model


def architecture_config(spec: ModelSpec, tokenizer, sizes: Sizes, tokenizer_dir: Path, data_dir: Path):
    """The transformers config, with the tokenizer's special ids (dsum's own random-init path)."""
    from dsum.modeling import model_config

    recipe = bench_recipe(spec, sizes, model_source={"architecture": spec.architecture}, tokenizer_dir=tokenizer_dir,
                          data_dir=data_dir, output_dir=tokenizer_dir.parent)
    return model_config(recipe, tokenizer)


def parameter_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def base_name(spec: ModelSpec) -> str:
    """Specs with the same architecture (Llama-2-7B for LoRA and QLoRA) share one saved base."""
    key = json.dumps([spec.architecture, spec.untied_head, recipe_settings(spec).get("model", {}).get("dtype")],
                     sort_keys=True)
    return f"{spec.architecture['model_type']}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def save_base(spec: ModelSpec, sizes: Sizes, data: BenchData, device: str, out: Path) -> tuple[Path, int]:
    """Random-init weights, seeded, saved once: every way loads the same ones."""
    import torch
    from transformers import AutoTokenizer, set_seed

    from dsum.bench.harness import free_memory

    count_file = out / "parameters.json"
    if count_file.is_file():  # saved already, for a spec with the same architecture
        return out, json.loads(count_file.read_text())["parameters"]
    tokenizer = AutoTokenizer.from_pretrained(data.tokenizer_dir)
    config = architecture_config(spec, tokenizer, sizes, data.tokenizer_dir, data.directory)
    dtype = getattr(torch, recipe_settings(spec).get("model", {}).get("dtype", "float32"))
    set_seed(sizes.seed)
    model = build_model(spec, config, device=device, dtype=dtype)  # on the GPU when there is one: fast
    count = parameter_count(model)
    model.save_pretrained(out)
    count_file.write_text(json.dumps({"parameters": count}))
    del model
    free_memory()
    return out, count


def eval_model(recipe: Recipe, base: Path, sizes: Sizes, device: str):
    """The model all three ways generate with: the random-init base (with a fresh LoRA adapter for
    LoRA/QLoRA recipes, which leaves its outputs unchanged), in Sizes.eval_dtype. The trained copies
    are not used: a few steps may teach one of them to stop early, and then it would generate less."""
    from dsum.modeling import add_lora, load_model

    recipe = recipe.model_copy(update={"model": recipe.model.model_copy(update={"dtype": sizes.eval_dtype})})
    model = load_model(recipe, base, for_training=False)
    if not getattr(model, "is_quantized", False):  # a 4-bit base is placed on the GPU as it loads
        model = model.to(device)
    if recipe.adapter.method != "none":
        model = add_lora(recipe, model)
    return model.eval()
