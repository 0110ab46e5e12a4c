"""The recipes of the bench's runs: one function builds them for the three-way bench and the goals run,
from the models' settings (inline, or read from a recipes directory) and dsum's speed settings."""

from __future__ import annotations

import copy
import math
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterable, Sequence

from dsum.bench.sizes import DSUM_OPTIONS, DSUM_SPEED, TOKEN_BUDGET, ModelSpec, Sizes
from dsum.config import Recipe, RecipeError, read_yaml, validate_recipe

# The GPU models take their settings from the repository's recipes/ (the product's layout keeps them
# there, outside the package): found beside the dsum package of a checkout, or given with --recipes.
CHECKOUT_RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def recipes_directory(given: Path | None) -> Path:
    """--recipes, or the recipes/ of the checkout this dsum was imported from; a one-line error if neither is."""
    if given is not None:
        if not given.is_dir():
            raise RecipeError(f"--recipes {given}: no such directory")
        return given
    if CHECKOUT_RECIPES.is_dir():
        return CHECKOUT_RECIPES
    raise RecipeError("--recipes: the GPU models take their settings from the recipes/ of a dsum checkout, and "
                      f"this dsum ({CHECKOUT_RECIPES.parent}) has none beside it; give --recipes DIR")


def load_recipes(specs: Iterable[ModelSpec], recipes: Path | None = None) -> list[ModelSpec]:
    """The specs with the settings of their recipe files in place of the files' names (read now, so that
    a missing file is refused before anything runs); inline settings stay as they are."""
    loaded = []
    for spec in specs:
        if isinstance(spec.recipe, str):
            spec = replace(spec, recipe=recipe_settings(spec, recipes), recipe_file=spec.recipe)
        loaded.append(spec)
    return loaded


def recipe_settings(spec: ModelSpec, recipes: Path | None = None) -> dict[str, Any]:
    """The spec's recipe settings as a raw mapping (a recipe file as written, so defaults stay defaults)."""
    if isinstance(spec.recipe, dict):
        return copy.deepcopy(spec.recipe)
    directory = recipes_directory(recipes)
    path = directory / spec.recipe
    if not path.is_file():
        raise RecipeError(f"--recipes {directory}: no {spec.recipe} in it, where dsum bench takes the {spec.name} "
                          "settings from")
    return read_yaml(path, "recipe")


def bench_recipe(spec: ModelSpec, sizes: Sizes, *, model_source: dict[str, Any], tokenizer_dir: Path, data_dir: Path,
                 output_dir: Path, as_written: bool = False, epoch: bool = False, eval_batch_size: int | None = None,
                 dsum: dict[str, dict[str, Any]] | None = None) -> Recipe:
    """The recipe of one bench run: the spec's settings on the bench's base (`model_source`), tokenizer and
    data, for the warm-up and timed steps (`epoch`: one epoch), validating, saving and tracking nothing
    inside the loop, generating with the settings every way uses; `dsum` ({"train": {...}, "eval": {...}}:
    dsum's speed settings and `--dsum`'s) over it, for dsum's own runs.

    The three-way bench sets what the ways share: truncation, AdamW at a constant learning rate. The goals
    run keeps the recipe `as_written` (its optimizer, schedule, truncation and generation), as users run it."""
    raw = recipe_settings(spec)
    model = raw.get("model", {})
    family = model["family"]
    raw["model"] = {"family": family, "dtype": model.get("dtype", "float32"), **model_source}
    tokenizer = {"name_or_path": str(tokenizer_dir)}
    raw["tokenizer"] = ({**raw.get("tokenizer", {}), **tokenizer} if as_written else
                        {**tokenizer, "max_source_length": sizes.max_source_length,
                         "max_target_length": sizes.max_target_length})
    raw["data"] = {"source": str(data_dir), "max_train_samples": sizes.train_examples}
    shared = {} if as_written else {"optimizer": "adamw", "lr_scheduler": "constant", "warmup_steps": 0,
                                    "warmup_ratio": 0.0}
    length = ({"num_epochs": 1, "max_steps": None} if epoch else
              {"max_steps": sizes.warmup_steps + sizes.train_steps,
               "logging_steps": sizes.warmup_steps})  # as before: each log reads the loss back from the device
    own = dsum or {}
    raw["train"] = {**raw.get("train", {}), **shared, **length, "eval_steps": None, "save_steps": None,
                    "eval_max_batches": 1, "trackers": [], "seed": sizes.seed, **own.get("train", {})}
    raw["eval"] = {**(raw.get("eval", {}) if as_written else {}), "after_training": False,
                   "max_new_tokens": sizes.max_new_tokens, "num_beams": 1, "do_sample": False, "validation_samples": 0,
                   **dsum_generation_settings(family, sizes, eval_batch_size), **own.get("eval", {})}
    raw["output_dir"] = str(output_dir)
    return validate_recipe(raw, source=f"dsum bench{' --goals' if as_written else ''} recipe for {spec.name}")


def check_dsum_settings(settings: dict[str, dict[str, Any]], specs: Sequence[ModelSpec],
                        sizes: Sizes) -> dict[str, dict[str, Any]]:
    """`--dsum` settings as every chosen model's recipe takes them, refused before anything runs when one
    does not (a value out of range, packing for a seq2seq model); returns them."""
    if not any(settings.values()):
        return settings
    here = Path(".")
    for spec in specs:
        try:
            bench_recipe(spec, sizes, model_source={"name_or_path": spec.name}, tokenizer_dir=here, data_dir=here,
                         output_dir=here, dsum=settings)
        except RecipeError as err:
            raise RecipeError(f"--dsum: {err}") from None
    return settings


def dsum_generation_settings(family: str, sizes: Sizes, batch_size: int | None = None) -> dict[str, Any]:
    """Sizes.dsum_generation for the family, with `batch_size` in place of its batch where given."""
    return {**sizes.dsum_generation[family], **({"batch_size": batch_size} if batch_size else {})}


def dsum_speed_settings(family: str, batch_size: int, features: Sequence) -> dict[str, Any]:
    """DSUM_SPEED for the family, with the token budget worked out from the training features (their
    tokens as dsum's batching counts them)."""
    from dsum.features import feature_tokens

    mean_tokens = sum(feature_tokens(f, family) for f in features) / len(features)
    budget = math.ceil(batch_size * mean_tokens / 64) * 64
    return {key: budget if value == TOKEN_BUDGET else value for key, value in DSUM_SPEED[family].items()}


def dsum_own_settings(recipe: Recipe, section: str) -> dict[str, Any]:
    """The recipe's values of DSUM_OPTIONS in one section, as the results report them."""
    values = getattr(recipe, section)
    return {key: getattr(values, key) for key in (option.split(".")[1] for option in DSUM_OPTIONS
                                                   if option.startswith(f"{section}."))}
