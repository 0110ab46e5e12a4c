"""The recipe schema: every shipped recipe validates; bad keys, types and overrides are named."""

from pathlib import Path

import pytest
import yaml

from dsum.config import RecipeError, load_recipe, recipe_to_dict, validate_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").rglob("*.yaml")) + [ROOT / "dsum" / "demo.yaml"]


def test_recipes_are_found():
    names = {str(p.relative_to(ROOT)) for p in RECIPES}
    for required in ("recipes/flan-t5-base/full.yaml", "recipes/flan-t5-base/lora.yaml",
                     "recipes/flan-t5-large/full.yaml", "recipes/flan-t5-large/lora.yaml",
                     "recipes/llama-2-7b/lora.yaml", "recipes/llama-2-7b/qlora.yaml",
                     *(f"recipes/tiny/{f}-{m}.yaml" for f in ("t5", "llama") for m in ("full", "lora", "qlora"))):
        assert required in names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_recipe_validates_and_says_how_to_launch_it(path):
    recipe = load_recipe(path)
    first = path.read_text().splitlines()[0]
    assert first.startswith("#"), "a recipe begins with a comment"
    header = path.read_text().split("\nmodel:")[0]
    assert "dsum train" in header or path.name == "demo.yaml"
    assert recipe.output_dir
    for line in header.splitlines():
        if "--config_file" in line:  # a launch config for several processes is always given their number
            config = yaml.safe_load((ROOT / line.split("--config_file ")[1].split()[0]).read_text())
            assert config.get("num_processes", 1) == 1 or "--num_processes" in line, line


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_resolved_recipe_is_a_recipe_again(path):
    """What run.json and `dsum validate` show, every default filled in, validates back to the same recipe."""
    recipe = load_recipe(path)
    assert validate_recipe(recipe_to_dict(recipe)) == recipe
    assert ("quantization" in recipe_to_dict(recipe)) == (recipe.adapter.method == "qlora")


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


MINIMAL = "model:\n  family: seq2seq\n  name_or_path: google/flan-t5-base\noutput_dir: runs/x\n"


def test_overrides_are_typed_by_the_schema(tmp_path):
    recipe = load_recipe(write(tmp_path, MINIMAL), [
        "train.learning_rate=2e-4", "output_dir=runs/123", "train.max_steps=7", "adapter.target_modules=[q,v]",
        "train.gradient_checkpointing=true", "eval.max_samples=null",
    ])
    assert recipe.train.learning_rate == pytest.approx(2e-4)
    assert recipe.output_dir == "runs/123"  # a string stays a string even when it looks like a number
    assert recipe.train.max_steps == 7
    assert recipe.adapter.target_modules == ["q", "v"]
    assert recipe.train.gradient_checkpointing is True
    assert recipe.eval.max_samples is None


def test_an_inline_architecture_takes_overrides_key_by_key(tmp_path):
    path = ROOT / "recipes" / "tiny" / "t5-full.yaml"
    recipe = load_recipe(path, ["model.architecture.num_layers=3", "model.architecture.dropout_rate=0.0"])
    assert recipe.model.architecture == {**load_recipe(path).model.architecture, "num_layers": 3, "dropout_rate": 0.0}
    with pytest.raises(RecipeError, match="num_layers is a value, not a mapping"):
        load_recipe(path, ["model.architecture.num_layers.depth=3"])
    # A recipe without an inline architecture (a Hub model, or a config.json path) is told what to do instead.
    with pytest.raises(RecipeError, match=r"model.architecture is not set in this recipe, so it has no keys to "
                                          r"override; set the whole of it instead \(model.architecture=\{...\}\)"):
        load_recipe(write(tmp_path, MINIMAL), ["model.architecture.num_layers=3"])
    with pytest.raises(RecipeError, match="model.architecture is 'conf.json' here, not an inline mapping"):
        load_recipe(path, ["model.architecture=conf.json", "model.architecture.num_layers=3"])


def test_required_keys_exist():
    from dsum.config import Recipe

    for key in ("max_steps", "num_epochs", "learning_rate", "per_device_batch_size", "gradient_accumulation_steps",
                "logging_steps", "save_steps", "eval_steps", "seed"):
        assert key in Recipe.model_fields["train"].annotation.model_fields
    assert "output_dir" in Recipe.model_fields


@pytest.mark.parametrize("text, overrides, expected", [
    (MINIMAL + "trian:\n  seed: 1\n", [], "unknown key 'trian' (did you mean train?)"),
    (MINIMAL + "train:\n  learning_rat: 1\n", [], "unknown key 'train.learning_rat' (did you mean train.learning_rate?)"),
    (MINIMAL, ["train.lerning_rate=1"], "unknown key 'lerning_rate' (did you mean train.learning_rate?)"),
    (MINIMAL, ["train.learning_rate=fast"], "train.learning_rate: got 'fast'"),
    (MINIMAL, ["train.learning_rate=0"], "train.learning_rate: got 0; input should be greater than 0"),
    (MINIMAL, ["train.max_steps=[1"], "override 'train.max_steps': cannot parse value '[1'"),
    (MINIMAL, ["train"], "override 'train': expected key.sub=value"),
    (MINIMAL, ["output_dir.x=1"], "output_dir is a value, not a section"),
    ("model: [1\n", [], "malformed YAML at line"),
    ("", [], "the file is empty"),
    ("- 1\n- 2\n", [], "expected a mapping of sections"),
    ("model:\n  family: causal\n  name_or_path: x\n", [], "missing required key 'output_dir'"),
    (MINIMAL.replace("seq2seq", "causal") + "prompt:\n  template: t5\n", [], "prompt.template 't5' is for seq2seq"),
    (MINIMAL + "adapter:\n  dropout: 1.0\n", [], "adapter.dropout: got 1.0"),
    # A value of a union (a number or a word) that is neither: the key alone, and what each would take.
    (MINIMAL, ["train.max_tokens_per_batch=atuo"], "train.max_tokens_per_batch: got 'atuo'; input should be a valid "
                                                    "integer, unable to parse string as an integer; or input should be 'auto'"),
    (MINIMAL, ["train.max_tokens_per_batch=0"], "train.max_tokens_per_batch: got 0; input should be greater than 0; or"),
    (MINIMAL, ["adapter.target_modules=5"], "adapter.target_modules: got 5; input should be a valid list; or input "
                                            "should be 'all-linear'"),
])
def test_bad_recipes_name_the_field(tmp_path, text, overrides, expected):
    with pytest.raises(RecipeError) as err:
        load_recipe(write(tmp_path, text), overrides)
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


def test_a_home_directory_in_any_path_setting_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    recipe = load_recipe(ROOT / "recipes" / "tiny" / "t5-full.yaml", [
        "output_dir=~/runs/x", "data.source=~/data", "tokenizer.train=false", "tokenizer.name_or_path=~/tokenizer",
        "model.architecture=~/config.json"])
    assert recipe.output_dir == str(tmp_path / "runs" / "x") and recipe.data.source == str(tmp_path / "data")
    assert recipe.tokenizer.name_or_path == str(tmp_path / "tokenizer")
    assert recipe.model.architecture == str(tmp_path / "config.json")
    hub = load_recipe(ROOT / "recipes" / "flan-t5-base" / "full.yaml", ["model.name_or_path=~/flan"])
    assert hub.model.name_or_path == str(tmp_path / "flan")
    assert load_recipe(ROOT / "recipes" / "flan-t5-base" / "full.yaml").model.name_or_path == "google/flan-t5-base"


def test_a_bare_no_is_the_choice_no_not_false(tmp_path):
    """YAML 1.1 reads `no` as false; `train.mixed_precision=no`, as the docs spell it, is still the choice "no"."""
    recipe = load_recipe(ROOT / "recipes" / "tiny" / "t5-full.yaml", ["train.mixed_precision=no"])
    assert recipe.train.mixed_precision == "no"
    text = (ROOT / "recipes" / "tiny" / "t5-full.yaml").read_text().replace("train:\n", "train:\n  mixed_precision: no\n")
    assert load_recipe(write(tmp_path, text)).train.mixed_precision == "no"
    with pytest.raises(RecipeError, match="train.mixed_precision: got True"):
        load_recipe(ROOT / "recipes" / "tiny" / "t5-full.yaml", ["train.mixed_precision=yes"])
