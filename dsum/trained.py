"""A trained model read back from any checkpoint dsum wrote, in whichever layout it is (`final/`, Accelerate's
`checkpoints/step-N`, DeepSpeed ZeRO's or FSDP's shards), with the base and tokenizer it was trained with."""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dsum.config import AdapterConfig, ModelConfig, Recipe, RecipeError, validate_recipe
from dsum.modeling import add_lora, auto_class, config_family, load_model, load_tokenizer, read_tokenizer, torch_dtype
from dsum.run_dir import (BASE_DIR, CHECKPOINTS, EVAL_DIR, FINAL, MARKER, RUN_FILE, STATE_FILE, TOKENIZER_DIR,
                          complete_checkpoints)

# The layouts a checkpoint is saved in. `final/` holds what transformers and peft save; a checkpoint saved
# mid-run holds what `accelerator.save_state` wrote, which depends on how the run was launched.
FINAL_LAYOUT = "final"  # config.json and model.safetensors, or adapter_config.json and adapter_model.safetensors
ACCELERATE = "accelerate"  # one process or DDP: model.safetensors, the state dict of the model as it trained
DEEPSPEED = "deepspeed"  # ZeRO-2 or ZeRO-3: each rank's shards in a folder that `latest` names
FSDP = "fsdp"  # FSDP's sharded state dict: torch.distributed.checkpoint's files, one per rank, in FSDP_WEIGHTS
ACCELERATE_WEIGHTS = "model.safetensors"
FSDP_WEIGHTS = "pytorch_model_fsdp_0"  # Accelerate's name for the first (dsum's only) model's sharded weights
METHODS = {"none": "full model", "lora": "LoRA adapter", "qlora": "QLoRA adapter"}


@dataclass(frozen=True)
class Checkpoint:
    """What a checkpoint directory holds, read from its small files before any weight is loaded."""

    path: Path
    label: str  # how errors name it: the argument and the path
    layout: str
    method: str  # none (a full model), lora or qlora
    recipe: Recipe  # what it was trained with (model, tokenizer, adapter, quantization), base in model.name_or_path
    config: Any  # the architecture's transformers config
    run: Path | None  # the run directory it is in, if any
    step: int | None  # the optimizer step it was saved at, if saved mid-run

    @property
    def family(self) -> str:
        return self.recipe.model.family

    @property
    def base(self) -> str | None:
        """The weights an adapter goes onto (the architecture of a full model saved mid-run); None for final/'s
        full model, which is whole."""
        return None if self.layout == FINAL_LAYOUT and self.method == "none" else self.recipe.model.name_or_path

    def describe(self) -> str:
        """In words: "the LoRA adapter saved at step 4 (DeepSpeed ZeRO shards)"."""
        if self.layout == FINAL_LAYOUT:
            return f"the {METHODS[self.method]} in {self.path.name}/"
        shards = {DEEPSPEED: "DeepSpeed ZeRO shards", FSDP: "FSDP shards"}.get(self.layout, "Accelerate state")
        return f"the {METHODS[self.method]} saved at step {self.step} ({shards})"


# ----------------------------------------------------------------------------------------------
# What a checkpoint is


def read_checkpoint(path: Path, *, base: str | None = None, recipe: Recipe | None = None,
                    argument: str = "--checkpoint") -> Checkpoint:
    """Everything about a checkpoint that its loading will rely on, checked before anything is loaded or
    written: its layout, what it was trained with (its trainer_state.json, else its run's run.json, else
    `recipe`), its base (`base`, else what its adapter_config.json or recipe names), its architecture and
    its tokenizer. A run directory stands for its final/. `recipe`, where given (dsum eval), must be of
    the same model family."""
    label = f"{argument} {path}" if argument else str(path)
    if not path.is_dir():
        raise RecipeError(f"{label}: no such directory")
    if (path / RUN_FILE).is_file():
        path = run_final(path, label)
    layout = layout_of(path, label)
    run = owning_run(path)
    adapter = adapter_config(path, label) if layout == FINAL_LAYOUT else None
    state = saved_state(path, label) if layout != FINAL_LAYOUT else {}
    try:
        trained = trained_recipe(state, path, run, label) or recipe
    except RecipeError:
        if recipe is None:
            raise
        trained = recipe  # saved by a dsum whose recipes this one no longer reads: the recipe given serves
    family = checkpoint_family(path, layout, adapter, trained, label)
    if recipe is not None and family != recipe.model.family:
        raise family_mismatch(recipe, family, path, layout, adapter, label)
    method = checkpoint_method(layout, adapter, trained)
    trained = trained or stand_in_recipe(path, family, method)
    named = None if layout == FINAL_LAYOUT and method == "none" else base_of(base, adapter, trained, run, label)
    loading = loading_recipe(trained, method, named or path, (recipe or trained).model.trust_remote_code)
    config = architecture_config(named or path, label, loading)
    check_tokenizer(path, loading, run, label)
    return Checkpoint(path, label, layout, method, loading, config, run, state.get("global_step"))


def run_final(run: Path, label: str) -> Path:
    """A run directory names its final/; one that has none yet is refused, naming its newest checkpoint."""
    if (run / FINAL).is_dir():
        return run / FINAL
    saved = complete_checkpoints(run)
    hint = f"name one of its checkpoints instead, such as {saved[-1]}" if saved else "and it saved no checkpoint"
    raise RecipeError(f"{label}: a run with no {FINAL}/ (it has not finished training); {hint}")


def layout_of(path: Path, label: str) -> str:
    """The layout a checkpoint is in, told by the files only it has; `saved_weights` reads each."""
    if (path / "adapter_config.json").is_file() or (path / "config.json").is_file():
        return FINAL_LAYOUT
    if not (path / STATE_FILE).is_file():
        raise RecipeError(f"{label}: not a checkpoint dsum wrote; expected a run, its final/ (config.json or "
                          f"adapter_config.json) or one of its {CHECKPOINTS}/step-N ({STATE_FILE})")
    if not (path / MARKER).is_file():
        raise RecipeError(f"{label}: an incomplete checkpoint (no {MARKER}: its save did not finish); name an "
                          "earlier one")
    if (path / "latest").is_file():  # DeepSpeed's engine names the folder of its shards in `latest`
        return DEEPSPEED
    if (path / FSDP_WEIGHTS / ".metadata").is_file():  # torch.distributed.checkpoint's index of the shards
        return FSDP
    if (path / ACCELERATE_WEIGHTS).is_file():
        return ACCELERATE
    raise RecipeError(f"{label}: a checkpoint whose weights are in no layout dsum reads (expected "
                      f"{ACCELERATE_WEIGHTS}, DeepSpeed's `latest` and its shards, or FSDP's {FSDP_WEIGHTS}/)")


def owning_run(checkpoint: Path) -> Path | None:
    """The run directory a checkpoint belongs to (its `final/` or `checkpoints/step-N`), if it is in one."""
    for candidate in (checkpoint.parent, checkpoint.parent.parent):
        if (candidate / RUN_FILE).is_file():
            return candidate
    return None


def adapter_config(checkpoint: Path, label: str) -> dict[str, Any] | None:
    """A checkpoint's adapter_config.json, read once; None for a full model. One line where it does not read."""
    path = checkpoint / "adapter_config.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise RecipeError(f"{label}: adapter_config.json does not read ({short(err)}); expected the JSON object "
                          "peft writes") from None
    if not isinstance(config, dict):
        raise RecipeError(f"{label}: adapter_config.json holds a {type(config).__name__}; expected the JSON object "
                          "peft writes")
    return config


def saved_state(path: Path, label: str) -> dict[str, Any]:
    """A checkpoint's trainer_state.json: its step, and the recipe it was trained with."""
    return read_json(path / STATE_FILE, label)


def read_json(file: Path, label: str) -> dict[str, Any]:
    try:
        saved = json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise RecipeError(f"{label}: {file.name} does not read ({short(err)})") from None
    if not isinstance(saved, dict):
        raise RecipeError(f"{label}: {file.name} holds a {type(saved).__name__}; expected the object dsum writes")
    return saved


def trained_recipe(state: dict[str, Any], path: Path, run: Path | None, label: str) -> Recipe | None:
    """The recipe a checkpoint was trained with: the one its trainer_state.json keeps, else its run's (run.json).
    None for a checkpoint outside any run, or from before dsum kept the recipe."""
    for saved, file in ((state, path / STATE_FILE), *([(read_json(run / RUN_FILE, label), run / RUN_FILE)] if run else [])):
        if isinstance(saved.get("recipe"), dict):
            return validate_recipe(saved["recipe"], source=f"{label}: the recipe in {file}")
    return None


def checkpoint_family(path: Path, layout: str, adapter: dict[str, Any] | None, trained: Recipe | None,
                      label: str) -> str:
    """seq2seq or causal: from the adapter's task type or the model's config.json in final/, else from the
    recipe it was trained with."""
    if adapter is not None:
        task = adapter.get("task_type")
        family = {"SEQ_2_SEQ_LM": "seq2seq", "CAUSAL_LM": "causal"}.get(task)
        if family is not None:
            return family
    elif layout == FINAL_LAYOUT:
        return config_family(architecture_config(path, label))
    if trained is None:
        raise RecipeError(f"{label}: cannot tell its model family (no task_type, and no recipe in its "
                          f"{STATE_FILE} or run.json); evaluate it with dsum eval RECIPE --checkpoint")
    return trained.model.family


def checkpoint_method(layout: str, adapter: dict[str, Any] | None, trained: Recipe | None) -> str:
    """A full model, or the kind of adapter: final/ says which by its files; whether an adapter's base was
    4-bit is its recipe's to say (LoRA where none does)."""
    method = trained.adapter.method if trained is not None else "none"
    if layout == FINAL_LAYOUT:
        return "none" if adapter is None else method if method != "none" else "lora"
    return method


def stand_in_recipe(path: Path, family: str, method: str) -> Recipe:
    """What a final/ outside any run, loaded without a recipe (dsum export), is taken to be: float32, LoRA."""
    return Recipe(model=ModelConfig(family=family, name_or_path=str(path)), adapter=AdapterConfig(method=method),
                  output_dir=str(path))


def family_mismatch(recipe: Recipe, family: str, path: Path, layout: str, adapter: dict[str, Any] | None,
                    label: str) -> RecipeError:
    """A checkpoint evaluated with a recipe of the other model family, refused in one line instead of failing
    deep in transformers."""
    what = (f"a {adapter.get('task_type')} adapter" if adapter is not None
            else f"a {architecture_config(path, label).model_type} model, {family}" if layout == FINAL_LAYOUT
            else f"a {family} model")
    return RecipeError(f"{label}: {what}, but the recipe's model.family is {recipe.model.family}; evaluate it with "
                       "the recipe it was trained with")


def loading_recipe(trained: Recipe, method: str, source: str | Path, trust_remote_code: bool) -> Recipe:
    """The recipe it was trained with, as the loading reads it: the base (or final/'s full model) in
    model.name_or_path, the method the checkpoint holds, and remote code as the user allows it."""
    own = str(source) == trained.model.name_or_path
    model = trained.model.model_copy(update={"name_or_path": str(source), "architecture": None,
                                             "revision": trained.model.revision if own else None,
                                             "trust_remote_code": trust_remote_code})
    return trained.model_copy(update={"model": model, "adapter": trained.adapter.model_copy(update={"method": method})})


def base_of(given: str | None, adapter: dict[str, Any] | None, trained: Recipe, run: Path | None,
            label: str) -> str | Path:
    """The base: `--base` where given; else the one adapter_config.json names, where it is still there (or
    is a Hub id); else the recipe's model.name_or_path, or the random-init base/ of its run."""
    if given is not None:
        return checked_base(given)
    named = (adapter or {}).get("base_model_name_or_path")
    if named and (Path(named).is_dir() or not Path(named).is_absolute()):
        return named
    if trained.model.name_or_path is not None:
        return trained.model.name_or_path
    base = (run or Path(trained.output_dir)) / BASE_DIR
    if not (base / "config.json").is_file():
        raise RecipeError(f"{label}: its random-init base is not in {base}; name the base with --base DIR")
    return base.resolve()


def checked_base(given: str) -> str | Path:
    """`--base`: a directory (made absolute, so that an exported adapter's config names it from anywhere), or
    a Hub id."""
    path = Path(given).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise RecipeError(f"--base {given}: no config.json there; expected a model directory or a Hub id")
        return path.resolve()
    if path.is_absolute() or given.startswith((".", "~")) or path.exists():
        raise RecipeError(f"--base {given}: no such directory; expected a model directory or a Hub id")
    return given


def architecture_config(source: str | Path, label: str, recipe: Recipe | None = None):
    """The architecture's config: final/'s config.json, or the base's (from the Hub cache or its directory)."""
    from transformers import AutoConfig

    from dsum.modeling import cannot_load

    m = recipe.model if recipe is not None else None
    try:
        return AutoConfig.from_pretrained(source, revision=m.revision if m else None,
                                          trust_remote_code=m.trust_remote_code if m else False)
    except OSError as err:
        if isinstance(source, Path) and (source / "config.json").is_file():
            raise RecipeError(f"{label}: config.json does not read as a model config ({short(err)})") from None
        raise cannot_load(f"{label}: its base", str(source), err) from None
    except ValueError as err:
        raise RecipeError(f"{label}: config.json does not read as a model config ({short(err)})") from None


def check_tokenizer(path: Path, trained: Recipe, run: Path | None, label: str) -> None:
    """The tokenizer is final/'s own; a checkpoint saved mid-run has none, and takes its run's: the one it
    trained (tokenizer.train), else tokenizer.name_or_path or the base's, from the Hub cache or a path."""
    if (path / "tokenizer_config.json").is_file():
        return
    if trained.tokenizer.train:
        trained_dir = (run or Path(trained.output_dir)) / TOKENIZER_DIR
        if not (trained_dir / "tokenizer.json").is_file():
            raise RecipeError(f"{label}: no tokenizer: it holds none, and its run's trained tokenizer is not in "
                              f"{trained_dir}")
    elif (trained.tokenizer.name_or_path or trained.model.name_or_path) == str(path):
        raise RecipeError(f"{label}: no tokenizer (tokenizer_config.json) in it, and no run around it to take one from")


def short(err: Exception) -> str:
    return str(err).splitlines()[0][:200] if str(err) else type(err).__name__


# ----------------------------------------------------------------------------------------------
# Loading it


def load_trained(checkpoint: Checkpoint, *, dequantize: bool = False):
    """(model, tokenizer) of any checkpoint, in eval mode: a full model, or a PeftModel, its adapter on the
    base it trained on (4-bit for QLoRA). With `dequantize`, a QLoRA base is dequantised to model.dtype
    first: the NF4 values the adapter trained against, as plain weights an adapter can be merged into."""
    tokenizer = checkpoint_tokenizer(checkpoint)
    if checkpoint.method == "none":
        model = full_model(checkpoint)
    else:
        model = adapter_model(checkpoint, dequantize)
    return model.eval(), tokenizer


def checkpoint_tokenizer(checkpoint: Checkpoint):
    if (checkpoint.path / "tokenizer_config.json").is_file():
        return read_tokenizer(checkpoint.path)
    return load_tokenizer(checkpoint.recipe, checkpoint.run or Path(checkpoint.recipe.output_dir))


def full_model(checkpoint: Checkpoint):
    """final/'s model as saved; else the architecture built from its config, with the weights saved mid-run."""
    recipe = checkpoint.recipe
    if checkpoint.layout == FINAL_LAYOUT:
        return load_model(recipe, checkpoint.path, for_training=False)
    with torch.device("meta"):  # the class transformers picks for this config, built without memory
        model_class = type(auto_class(checkpoint.family).from_config(checkpoint.config))
    model, info = model_class.from_pretrained(None, config=checkpoint.config, state_dict=saved_weights(checkpoint),
                                              dtype=torch_dtype(recipe.model.dtype), output_loading_info=True)
    missing = info["missing_keys"] or info["unexpected_keys"]
    if missing:
        raise RecipeError(f"{checkpoint.label}: its weights do not fit the architecture of {recipe.model.name_or_path} "
                          f"({sorted(missing)[0]}); name the base it was trained from with --base")
    return model


def adapter_model(checkpoint: Checkpoint, dequantize: bool):
    """The base as it was trained on, and the adapter onto it: final/'s as peft saved it, or, from a
    checkpoint saved mid-run, the weights the adapter trained (the rest of that state is the frozen base)."""
    from peft import PeftModel

    recipe = checkpoint.recipe
    base = load_model(recipe, recipe.model.name_or_path, for_training=False)  # 4-bit for QLoRA
    if dequantize and checkpoint.method == "qlora":
        base = base.dequantize(dtype=torch_dtype(recipe.model.dtype))
    if checkpoint.layout == FINAL_LAYOUT:
        return PeftModel.from_pretrained(base, checkpoint.path)
    model = add_lora(recipe, base)
    trained = {name for name, param in model.named_parameters() if param.requires_grad}
    weights = saved_weights(checkpoint, trained)
    if trained - weights.keys():
        raise RecipeError(f"{checkpoint.label}: it lacks {sorted(trained - weights.keys())[0]}, which its recipe's "
                          "adapter trains; was it saved by another recipe?")
    model.load_state_dict(weights, strict=False)
    return model


def saved_weights(checkpoint: Checkpoint, names: set[str] | None = None) -> dict[str, torch.Tensor]:
    """The weights a checkpoint saved mid-run, keyed as `model.state_dict()` keys them: all, or only `names`."""
    readers = {ACCELERATE: accelerate_weights, DEEPSPEED: zero_weights, FSDP: fsdp_weights}  # one per layout
    try:
        return readers[checkpoint.layout](checkpoint.path, names)
    except Exception as err:  # noqa: BLE001 - the readers only read files: whatever they raise (safetensors'
        # SafetensorError, a pickle that does not unpickle, a torch error), the files are not what they should be
        raise RecipeError(f"{checkpoint.label}: its weights do not read ({type(err).__name__}: {short(err)})") from None


def accelerate_weights(path: Path, names: set[str] | None) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    with safe_open(path / ACCELERATE_WEIGHTS, framework="pt") as weights:
        return {key: weights.get_tensor(key) for key in weights.keys() if names is None or key in names}


def zero_weights(path: Path, names: set[str] | None) -> dict[str, torch.Tensor]:
    """The fp32 weights of a ZeRO-2 or ZeRO-3 checkpoint, gathered from every rank's shards by DeepSpeed's own
    utility; an adapter's alone (what the optimizer held) when `names` are the adapter's."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # its progress
        state = get_fp32_state_dict_from_zero_checkpoint(str(path), exclude_frozen_parameters=names is not None)
    return {key: value for key, value in state.items() if names is None or key in names}


def fsdp_weights(path: Path, names: set[str] | None) -> dict[str, torch.Tensor]:
    """The weights of an FSDP checkpoint, its shards read into whole tensors in this one process by
    torch.distributed.checkpoint; only `names` where given (an adapter's, without its frozen base)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(path / FSDP_WEIGHTS)
    prefix = "model."  # Accelerate saves {"model": state_dict}, which the index keys flattened
    weights = {key.removeprefix(prefix): torch.empty(saved.size, dtype=saved.properties.dtype)
               for key, saved in reader.read_metadata().state_dict_metadata.items()
               if isinstance(saved, TensorStorageMetadata) and key.startswith(prefix)
               and (names is None or key.removeprefix(prefix) in names)}
    dcp.load({"model": weights}, storage_reader=reader, no_dist=True)
    return weights


# ----------------------------------------------------------------------------------------------
# For dsum eval


def load_for_eval(recipe: Recipe, checkpoint: Path | Checkpoint | None):
    """(model, tokenizer): any checkpoint (`read_checkpoint`), or the recipe's base alone (zero-shot). The
    recipe gives the evaluation settings; `eval.merge_adapter` folds a LoRA adapter into its base."""
    if checkpoint is None:
        return load_model(recipe, recipe_base(recipe), for_training=False), load_tokenizer(recipe, Path(recipe.output_dir))
    if isinstance(checkpoint, Path):
        checkpoint = read_checkpoint(checkpoint, recipe=recipe)
    check_merge(recipe, checkpoint)
    model, tokenizer = load_trained(checkpoint)
    return (model.merge_and_unload() if recipe.eval.merge_adapter and checkpoint.method != "none" else model), tokenizer


def check_merge(recipe: Recipe, checkpoint: Checkpoint) -> None:
    if recipe.eval.merge_adapter and checkpoint.method == "qlora":
        raise RecipeError(f"eval.merge_adapter: {checkpoint.label} is a QLoRA adapter, which cannot be folded into "
                          "its 4-bit base without losing precision; leave it false (dsum export --merge writes "
                          "the adapter merged into the dequantised base)")


def recipe_base(recipe: Recipe) -> str | Path:
    """The recipe's base weights: model.name_or_path, or the random-init base its run wrote."""
    if recipe.model.name_or_path is not None:
        return recipe.model.name_or_path
    base = Path(recipe.output_dir) / BASE_DIR
    if not (base / "config.json").is_file():
        raise RecipeError(f"model.architecture: no random-init base in {base}; train the recipe first, or give "
                          "output_dir=RUN of the run that trained it")
    return base


def evaluation_dir(recipe: Recipe, checkpoint: Checkpoint | None) -> Path:
    """Where `dsum eval` writes without --output-dir: a run's eval/ for its final/, eval/step-N for one of its
    checkpoints; else the recipe's output_dir/eval."""
    if checkpoint is not None and checkpoint.run is not None:
        if checkpoint.path.name == FINAL:
            return checkpoint.run / EVAL_DIR
        if checkpoint.path.parent.name == CHECKPOINTS:
            return checkpoint.run / EVAL_DIR / checkpoint.path.name
    return Path(recipe.output_dir) / EVAL_DIR
