"""What `dsum validate` shows: the resolved recipe and what training it would do, without training."""

from __future__ import annotations

import yaml

from dsum.batching import training_plan
from dsum.config import Recipe, RecipeError, recipe_to_dict
from dsum.console import describe_batch
from dsum.data import load_split
from dsum.features import IGNORE_INDEX, Featurizer, feature_tokens


def describe_recipe(recipe: Recipe, world_size: int) -> str:
    """Parts that need a model or tokenizer the machine cannot reach (a Hub id, offline) say so and the rest is
    still shown: the recipe itself is valid, and the run will fetch them where it runs."""
    from dsum.modeling import (check_packing, describe_parameters, load_tokenizer, meta_model, model_config,
                               train_tokenizer)

    lines = ["# resolved recipe", yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False).rstrip(), "", "# run"]
    examples = load_split(recipe.data, recipe.data.train_split)
    if recipe.model.trust_remote_code:  # its tokenizer and config may be the model's own code: never run here
        lines += describe_plan(recipe, examples, None, world_size)
        lines.append("parameters and example: not available here: dsum validate never runs a model's own code "
                     "(model.trust_remote_code is true)")
        return "\n".join(lines)
    try:
        if recipe.tokenizer.train:  # trained in memory here; `dsum train` caches it in the output directory
            tokenizer = train_tokenizer(recipe, (t for e in examples for t in (e.dialogue, *e.references)))
        else:
            tokenizer = load_tokenizer(recipe, output_dir=None)
        config = model_config(recipe, tokenizer)
    except RecipeError as err:
        if recipe.model.name_or_path is None:  # built here from the recipe: the recipe is wrong
            raise
        lines += describe_plan(recipe, examples, None, world_size)
        lines.append(f"parameters and example: not available here ({err})")  # a Hub model, offline
        return "\n".join(lines)
    check_packing(recipe, config)
    lines += describe_plan(recipe, examples, tokenizer, world_size)
    lines.append(describe_parameters(meta_model(recipe, config)))
    lines += ["", "# one training example (the loss is taken on the [loss] part only)"]
    lines += render_example(recipe, tokenizer, examples[0])
    return "\n".join(lines)


def describe_plan(recipe: Recipe, examples, tokenizer, world_size: int) -> list[str]:
    """Batch size and optimizer steps; under a token budget they follow the token lengths (the tokenizer's)."""
    cfg = recipe.train
    if cfg.max_tokens_per_batch is None:
        plan = training_plan(cfg, [0] * len(examples), world_size, 0)
        size = describe_batch(plan)
    elif cfg.max_tokens_per_batch == "auto":
        return [f"world size: {world_size}", "micro-batches of as many tokens as fit the GPU, probed when training "
                "starts (train.max_tokens_per_batch: auto); optimizer steps depend on that budget"]
    elif tokenizer is None:
        return [f"world size: {world_size}", f"micro-batches of up to {cfg.max_tokens_per_batch} tokens per device; "
                "optimizer steps depend on token lengths, unknown without the tokenizer"]
    else:
        features = Featurizer(recipe, tokenizer).training_features(examples)
        plan = training_plan(cfg, [feature_tokens(f, recipe.model.family) for f in features], world_size, 0)
        size = describe_batch(plan)
    total = plan.total_steps(cfg.num_epochs, cfg.max_steps)
    return [
        f"world size: {world_size}",
        size + ("; packed end to end" if cfg.packing else "") + ("; grouped by length" if cfg.group_by_length else ""),
        f"training examples: {len(examples)}; optimizer steps per epoch: {plan.steps_per_epoch}; "
        f"optimizer steps: {total} ({plan.epochs_done(total):.2f} epochs)",
        f"prompt template: {recipe.template}; adapter: {recipe.adapter.method}",
    ]


def render_example(recipe: Recipe, tokenizer, example) -> list[str]:
    featurizer = Featurizer(recipe, tokenizer)
    feature = featurizer.training_feature(example)
    if recipe.model.family == "seq2seq":
        masked, supervised = feature.input_ids, feature.labels
        counts = f"{len(feature.input_ids)} encoder tokens, {len(feature.labels)} target tokens"
    else:
        masked = [t for t, label in zip(feature.input_ids, feature.labels) if label == IGNORE_INDEX]
        supervised = [label for label in feature.labels if label != IGNORE_INDEX]
        counts = f"{len(feature.input_ids)} tokens: {len(masked)} masked, {len(supervised)} with loss"
    return [
        f"id: {example.id} ({counts})",
        "[masked] " + tokenizer.decode(masked).replace("\n", "\n         "),
        "[loss]   " + tokenizer.decode(supervised).replace("\n", "\n         "),
    ]
