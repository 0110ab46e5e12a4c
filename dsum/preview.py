"""What `dsum validate` shows: the resolved recipe and what training it would do, without training.

Parts that need a model or tokenizer the machine cannot reach (a Hub id, offline) say so and the
rest is still shown: the recipe itself is valid, and the run will fetch them where it runs.
"""

from __future__ import annotations

import yaml

from dsum.batching import BatchPlan
from dsum.config import Recipe, RecipeError, recipe_to_dict
from dsum.data import load_split
from dsum.features import IGNORE_INDEX, Featurizer


def describe_recipe(recipe: Recipe, world_size: int) -> str:
    from dsum.modeling import describe_parameters, meta_model, model_config, train_tokenizer, load_tokenizer

    cfg = recipe.train
    lines = ["# resolved recipe", yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False).rstrip(), "", "# run"]
    examples = load_split(recipe.data, recipe.data.train_split)
    plan = BatchPlan(len(examples), cfg.per_device_batch_size, cfg.gradient_accumulation_steps, world_size, 0, cfg.seed)
    total = plan.total_steps(cfg.num_epochs, cfg.max_steps)
    lines += [
        f"world size: {world_size}",
        f"global batch size: {plan.global_batch_size} "
        f"(= {cfg.per_device_batch_size} per device x {cfg.gradient_accumulation_steps} accumulation x {world_size} processes)",
        f"training examples: {len(examples)}; optimizer steps per epoch: {plan.steps_per_epoch}; "
        f"optimizer steps: {total} ({total / plan.steps_per_epoch:.2f} epochs)",
        f"prompt template: {recipe.template}; adapter: {recipe.adapter.method}",
    ]
    try:
        if recipe.tokenizer.train:  # trained in memory here; `dsum train` caches it in the output directory
            tokenizer = train_tokenizer(recipe, (t for e in examples for t in (e.dialogue, *e.references)))
        else:
            tokenizer = load_tokenizer(recipe, output_dir=None)
        config = model_config(recipe, tokenizer)
        lines.append(describe_parameters(meta_model(recipe, config)))
    except RecipeError as err:
        if recipe.model.name_or_path is None:  # built here from the recipe: the recipe is wrong
            raise
        lines.append(f"parameters and example: not available here ({err})")  # a Hub model, offline
        return "\n".join(lines)
    lines += ["", "# one training example (the loss is taken on the [loss] part only)"]
    lines += render_example(recipe, tokenizer, examples[0])
    return "\n".join(lines)


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
