"""The recipe schema: every setting dsum reads, its type, its default and its limits. Nothing else in the
package restates a default: it reads it from the validated `Recipe`."""

from __future__ import annotations

import difflib
import os
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class RecipeError(ValueError):
    """A recipe, an override or a data file that cannot be used; the message is one line for people."""


class RunError(RuntimeError):
    """A run that cannot go on (a non-finite loss, a failed save); the message is one line for people."""


class Section(BaseModel):
    # No infinite or NaN settings: a learning rate or epoch count of .inf passes every bound and breaks later.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False, allow_inf_nan=False)


SEED = {"ge": 0, "lt": 2**32, "description": "0 to 2^32 - 1, what numpy's generator takes"}


def home_expanded(value: Any) -> Any:
    """`~/x` and `~user/x` as the shell would give them, for every setting that may be a local path (the
    Hub's ids never start with ~)."""
    return os.path.expanduser(value) if isinstance(value, str) and value.startswith("~") else value


Dtype = Literal["float32", "bfloat16", "float16"]


def yaml_no(value: Any) -> Any:
    """YAML reads a bare `no` as false, in a recipe and in `key=no` alike; where "no" is a choice, it means that."""
    return "no" if value is False else value


class ModelConfig(Section):
    family: Literal["seq2seq", "causal"] = Field(
        description="seq2seq (T5-style encoder-decoder) or causal (decoder-only, Llama-style)"
    )
    name_or_path: str | None = Field(None, description="Hub id or local directory of a pretrained model")
    architecture: dict[str, Any] | str | None = Field(
        None,
        description="random init instead of pretrained weights: an inline config (with model_type) or a config.json path",
    )
    revision: str | None = None
    dtype: Dtype = Field("float32", description="dtype the base weights are loaded in")
    trust_remote_code: bool = False
    attn_implementation: str | None = Field(None, description="eager, sdpa or flash_attention_2; None lets transformers choose")

    _paths = field_validator("name_or_path", "architecture")(home_expanded)

    @field_validator("attn_implementation")
    @classmethod
    def _known_attention(cls, value: str | None) -> str | None:
        if value is None or "/" in value:  # a kernel on the Hub (kernels-community/...): checked when it loads
            return value
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        known = ["eager", *(k.removeprefix("paged|") for k in ALL_ATTENTION_FUNCTIONS.valid_keys())]
        if value.removeprefix("paged|") not in known:
            raise ValueError(f"got {value!r}; expected one of {', '.join(dict.fromkeys(known))} "
                             "(or a Hub kernel, org/name)")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        if (self.name_or_path is None) == (self.architecture is None):
            raise ValueError("set exactly one of model.name_or_path (pretrained weights) and model.architecture (random init)")
        if isinstance(self.architecture, dict) and "model_type" not in self.architecture:
            raise ValueError("model.architecture needs a model_type (for example t5 or llama)")
        return self


class TokenizerConfig(Section):
    name_or_path: str | None = Field(None, description="Hub id or path; defaults to model.name_or_path")
    train: bool = Field(False, description="train a tokenizer on the training split (cached in the output directory)")
    vocab_size: int = Field(2000, gt=16)
    max_source_length: int = Field(512, gt=0, description="token budget of the prompt; the dialogue is cut to fit")
    max_target_length: int = Field(128, gt=0, description="token budget of the summary; its end is cut to fit")

    _paths = field_validator("name_or_path")(home_expanded)


class SyntheticConfig(Section):
    train_size: int = Field(2000, gt=0)
    validation_size: int = Field(64, gt=0)
    test_size: int = Field(101, gt=0)
    seed: int = Field(1234, **SEED)


class DataConfig(Section):
    source: str = Field("synthetic", description="'synthetic', a local directory of split files, or a Hub dataset id")
    dialogue_field: str = "dialogue"
    summary_fields: list[str] | None = Field(
        None, description="reference columns; None uses 'summary', or 'summary1', 'summary2', ... when a split has those"
    )
    id_field: str | None = Field(None, description="id column; None uses 'id', then 'fname', then the row number")
    train_split: str = "train"
    validation_split: str = "validation"
    max_train_samples: int | None = Field(None, gt=0)
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)

    _paths = field_validator("source")(home_expanded)


TEMPLATE_FAMILIES: dict[str, tuple[str, ...]] = {
    "t5": ("seq2seq",),
    "llama2": ("causal",),
    "plain": ("seq2seq", "causal"),
}


class PromptConfig(Section):
    template: Literal["t5", "llama2", "plain"] | None = Field(
        None, description="t5 (instruction), llama2 ([INST]) or plain; None picks by model family"
    )
    instruction: str = "Summarize the following conversation."
    system: str | None = Field(None, description="system prompt, for templates that have one")
    shots: int = Field(0, ge=0, description="evaluation only: solved examples from the training split put before each "
                                            "dialogue, as many of K as fit in tokenizer.max_source_length")


class AdapterConfig(Section):
    method: Literal["none", "lora", "qlora"] = "none"
    r: int = Field(16, gt=0)
    alpha: int = Field(16, gt=0)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["all-linear"] | None = Field(
        None, description="module names to adapt; None uses peft's default for the architecture"
    )
    bias: Literal["none", "all", "lora_only"] = "none"


class QuantizationConfig(Section):
    """How the frozen base is stored when adapter.method is qlora."""

    quant_type: Literal["nf4", "fp4"] = "nf4"
    compute_dtype: Dtype = "bfloat16"
    double_quant: bool = True
    storage_dtype: Dtype | Literal["uint8"] = Field(
        "uint8", description="dtype the 4-bit weights are packed in; under ZeRO-3 or FSDP it must equal model.dtype"
    )


class TrainConfig(Section):
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "adafactor"] = "adamw"
    learning_rate: float = Field(5e-5, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    adam_beta1: float = Field(0.9, ge=0.0, lt=1.0)
    adam_beta2: float = Field(0.999, ge=0.0, lt=1.0)
    adam_epsilon: float = Field(1e-8, gt=0.0)
    lr_scheduler: Literal["linear", "cosine", "constant"] = "linear"
    warmup_steps: int = Field(0, ge=0)
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0, description="used when warmup_steps is 0")
    num_epochs: float = Field(1.0, gt=0.0)
    max_steps: int | None = Field(None, gt=0, description="optimizer steps; overrides num_epochs")
    per_device_batch_size: int = Field(8, gt=0)
    group_by_length: bool = Field(False, description="batches of similar length (less padding); the order of "
                                                     "optimizer steps stays random")
    max_tokens_per_batch: Annotated[int, Field(gt=0)] | Literal["auto"] | None = Field(
        None, description="fill each micro-batch up to this many tokens per device (padding included) instead of "
                          "per_device_batch_size examples; an example longer than it trains alone. auto: the largest "
                          "budget that fits the GPU, probed at the start (dsum/sizing.py)")
    packing: bool = Field(False, description="causal models: put a micro-batch's examples end to end in one row, "
                                             "with position_ids restarting at each, so there is no padding and "
                                             "attention never crosses examples")
    compile: bool = Field(False, description="torch.compile each of the model's repeated blocks (its layers) in place; "
                                             "the first steps wait for compilation")
    pad_to_multiple_of: int | None = Field(
        None, gt=0, description="pad each micro-batch's rows (or its packed row) to a multiple of this many tokens; "
                                "None: 64 with train.compile, else to the longest row alone")
    gradient_accumulation_steps: int = Field(1, gt=0)
    max_grad_norm: float | None = Field(1.0, gt=0.0)
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    on_nonfinite_loss: Literal["stop", "skip"] = Field(
        "stop", description="a NaN or infinite loss: stop with its step number (the last checkpoint is kept), or "
                            "skip: drop that optimizer step's update and count it")
    gradient_checkpointing: bool = False
    fast_cpu_dropout: bool = Field(True, description="on the CPU: draw dropout masks from random integers, "
                                                     "faster than PyTorch's bernoulli_, with the same "
                                                     "distribution (dsum/cpu_dropout.py); false: PyTorch's own")
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    seed: int = Field(42, **SEED)
    logging_steps: int = Field(10, gt=0)
    eval_steps: int | None = Field(None, gt=0, description="validation loss every N optimizer steps; None: only at the end")
    eval_max_batches: int | None = Field(None, gt=0, description="validation subset: at most N batches per rank")
    save_steps: int | None = Field(None, gt=0, description="checkpoint every N optimizer steps; None: none mid-run")
    save_total_limit: int = Field(2, gt=0, description="checkpoints kept")
    trackers: list[Literal["tensorboard", "wandb", "mlflow", "aim", "comet_ml", "clearml"]] = Field(
        default_factory=lambda: ["tensorboard"], description="experiment trackers; one that is not installed is skipped"
    )


    _no = field_validator("mixed_precision", mode="before")(yaml_no)

    @property
    def padding_multiple(self) -> int:
        """The multiple micro-batches are padded to: pad_to_multiple_of, or its default."""
        if self.pad_to_multiple_of is not None:
            return self.pad_to_multiple_of
        return 64 if self.compile else 1


class EvalConfig(Section):
    split: str = "test"
    max_samples: int | None = Field(None, gt=0)
    batch_size: int = Field(16, gt=0)
    encoder_batch_size: int | None = Field(
        None, gt=0, description="seq2seq on a CPU: prompts the encoder takes at a time, each part padded only to its "
                                "own longest prompt; the decoder still steps through eval.batch_size rows together "
                                "(null: the whole batch at once, as a GPU always does; on a CPU 16 is faster, see "
                                "BENCHMARKS.md)")
    max_new_tokens: int = Field(64, gt=0)
    num_beams: int = Field(1, gt=0)
    do_sample: bool = False
    temperature: float = Field(1.0, gt=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    no_repeat_ngram_size: int = Field(0, ge=0)
    after_training: bool = Field(True, description="generate and score eval.split at the end of dsum train")
    validation_samples: int = Field(0, ge=0, description="validation dialogues generated and scored (ROUGE) with each "
                                                         "validation loss during training; 0 for the loss alone")
    cache: Literal["dynamic", "static"] = Field(
        "dynamic", description="KV cache of generation: dynamic grows it as tokens come, static preallocates it "
                               "at full length, which lets the decoding step be compiled")
    compile: bool = Field(False, description="compile the decoding step with torch.compile (needs eval.cache: static; "
                                             "the first batches wait for compilation)")
    merge_adapter: bool = Field(False, description="dsum eval of a LoRA adapter: fold it into the base weights "
                                                   "before generating (faster; not for QLoRA's 4-bit base)")


class Recipe(Section):
    model: ModelConfig
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    prompt: PromptConfig = Field(default_factory=PromptConfig)
    adapter: AdapterConfig = Field(default_factory=AdapterConfig)
    quantization: QuantizationConfig = Field(default_factory=QuantizationConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    output_dir: str

    _paths = field_validator("output_dir")(home_expanded)

    @model_validator(mode="after")
    def _combinations(self) -> Recipe:
        family = self.model.family
        if self.prompt.template is not None and family not in TEMPLATE_FAMILIES[self.prompt.template]:
            raise ValueError(
                f"prompt.template {self.prompt.template!r} is for {' or '.join(TEMPLATE_FAMILIES[self.prompt.template])} "
                f"models, but model.family is {family!r}"
            )
        if self.tokenizer.name_or_path is None and not self.tokenizer.train and self.model.name_or_path is None:
            raise ValueError("a randomly initialised model needs tokenizer.name_or_path or tokenizer.train: true")
        if self.tokenizer.train and self.tokenizer.name_or_path is not None:
            raise ValueError("tokenizer.train: true trains a new tokenizer, so tokenizer.name_or_path would go unused; "
                             "set one of the two")
        if "quantization" in self.model_fields_set and self.adapter.method != "qlora":
            raise ValueError(f"quantization is set but adapter.method is {self.adapter.method!r}; a 4-bit base is "
                             "frozen, so it needs adapter.method: qlora (or remove the quantization section)")
        if self.eval.merge_adapter and self.adapter.method == "qlora":
            raise ValueError("eval.merge_adapter cannot fold an adapter into a 4-bit base without losing precision; "
                             "leave it false for QLoRA")
        if self.train.packing and family != "causal":
            raise ValueError("train.packing puts examples end to end in one decoder row, which only causal models "
                             "have; use train.group_by_length or train.max_tokens_per_batch for seq2seq")
        if self.eval.encoder_batch_size is not None and family != "seq2seq":
            raise ValueError("eval.encoder_batch_size sets how many prompts the encoder takes at a time, and only "
                             "seq2seq models have an encoder; remove it for a causal model")
        if self.eval.compile and self.eval.cache != "static":
            raise ValueError("eval.compile needs eval.cache: static; a dynamic cache changes shape at every token")
        if self.eval.compile and self.adapter.method == "qlora":
            raise ValueError("eval.compile: transformers does not compile a 4-bit base (it would generate "
                             "uncompiled); set eval.compile: false for QLoRA")
        if self.adapter.method == "qlora" and self.quantization.compute_dtype == "float16" and family == "seq2seq":
            raise ValueError("quantization.compute_dtype float16 overflows in T5-style models; use bfloat16 or float32")
        return self

    @property
    def template(self) -> str:
        """The prompt template in force: the recipe's, or the family's own."""
        if self.prompt.template is not None:
            return self.prompt.template
        return "t5" if self.model.family == "seq2seq" else "plain"


# ----------------------------------------------------------------------------------------------
# Loading, overriding and explaining errors


MAX_ALIASES = 32  # a recipe shares a few values at most; a few lines of nested aliases can expand to gigabytes


class StrictLoader(yaml.SafeLoader):
    """yaml's safe loader (no Python tags), which also refuses a key given twice in one mapping (yaml
    would keep the second silently) and more than MAX_ALIASES aliases."""

    def __init__(self, stream):
        super().__init__(stream)
        self.aliases = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > MAX_ALIASES:
                raise yaml.constructor.ConstructorError(
                    None, None, f"more than {MAX_ALIASES} aliases (*name), which can expand without bound",
                    self.peek_event().start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, (str, int, float, bool)):  # unhashable keys: yaml's own error follows
                continue
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"{key!r} is given twice in one mapping",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str) -> Any:
    """YAML text read by `StrictLoader` (yaml.safe_load with the refusals above)."""
    loader = StrictLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def read_yaml(path: Path, what: str) -> Any:
    """A YAML file, read by `StrictLoader`; a file that does not read is one line naming it and where."""
    try:
        return parse_yaml(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or "it is not valid YAML"
        raise RecipeError(f"{what} {path}: malformed YAML{where}: {problem}") from None
    except UnicodeDecodeError:
        raise RecipeError(f"{what} {path}: not UTF-8 text") from None


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a YAML recipe, apply `key.sub=value` overrides, and validate the result against `Recipe`.

    The overrides are applied to the YAML before validation, so they are typed by the same schema.
    """
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe {path}: no such file")
    raw = read_yaml(path, "recipe")
    if raw is None:
        raise RecipeError(f"recipe {path}: the file is empty; expected a mapping with at least model and output_dir")
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe {path}: expected a mapping of sections (model, train, ...), found a {type(raw).__name__}")
    for item in overrides:
        apply_override(raw, item)
    return validate_recipe(raw, source=str(path))


def validate_recipe(raw: dict[str, Any], source: str = "recipe") -> Recipe:
    try:
        return Recipe.model_validate(raw)
    except ValidationError as err:
        raise RecipeError(f"{source}: {explain(err.errors())}") from None


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Set `key.sub=value` in the raw recipe, parsing the value by the type the schema gives the key."""
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise RecipeError(f"override {item!r}: expected key.sub=value, for example train.learning_rate=2e-4")
    parts = key.split(".")
    model: type[BaseModel] = Recipe
    node = raw
    for depth, part in enumerate(parts):
        fields = model.model_fields
        if part not in fields:
            prefix = ".".join(parts[:depth])
            raise RecipeError(f"override {key!r}: unknown key {part!r}{_nearest(part, fields, prefix)}")
        annotation = fields[part].annotation
        last = depth == len(parts) - 1
        section = _section_type(annotation)
        if last:
            node[part] = _parse_value(text, annotation, key)
        elif section is None and isinstance(node.get(part), dict):  # an inline mapping: model.architecture.num_layers
            mapping = node[part] = dict(node[part])
            for sub in parts[depth + 1 : -1]:
                mapping = mapping.setdefault(sub, {})
                if not isinstance(mapping, dict):
                    raise RecipeError(f"override {key!r}: {sub} is a value, not a mapping")
            mapping[parts[-1]] = _parse_value(text, Any, key)
            return
        elif section is None:
            raise RecipeError(f"override {key!r}: {_no_keys_to_override('.'.join(parts[: depth + 1]), node.get(part), annotation)}")
        else:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node, model = child, section


def _no_keys_to_override(name: str, value: Any, annotation: Any) -> str:
    """Why `name.sub=...` cannot be applied: `name` holds no inline mapping in this recipe."""
    if not any(typing.get_origin(a) is dict for a in typing.get_args(annotation)):
        return f"{name} is a value, not a section"
    held = "is not set in this recipe" if value is None else f"is {value!r} here, not an inline mapping"
    return f"{name} {held}, so it has no keys to override; set the whole of it instead ({name}={{...}})"


def _section_type(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _parse_value(text: str, annotation: Any, key: str) -> Any:
    """Strings stay as typed; everything else is read as a YAML scalar or flow list, then validated."""
    if _accepts_plain_string(annotation) and not text.startswith(("[", "{")) and text not in ("null", "~"):
        return text
    try:
        return parse_yaml(text) if text else None
    except yaml.YAMLError:
        raise RecipeError(f"override {key!r}: cannot parse value {text!r}") from None


def _accepts_plain_string(annotation: Any) -> bool:
    if annotation is str:
        return True
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        args = typing.get_args(annotation)
        return str in args and not any(typing.get_origin(a) is Literal for a in args)
    return False


def _nearest(name: str, candidates: typing.Iterable[str], prefix: str = "") -> str:
    match = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.5)
    if not match:
        return ""
    return f" (did you mean {prefix + '.' if prefix else ''}{match[0]}?)"


def explain(errors: list[dict[str, Any]]) -> str:
    """One line from pydantic's errors: the dotted key, what was given and what was expected. A value
    that matches no member of a union (an int or "auto") gets one error per member: their
    expectations are joined."""
    error = errors[0]
    kind = error.get("type", "")
    # An unknown key is no field: its location is taken as it is.
    loc = ([str(p) for p in error.get("loc", ()) if not isinstance(p, int)] if kind == "extra_forbidden"
           else field_path(error.get("loc", ())))
    key = ".".join(loc)
    if kind == "extra_forbidden":
        model: type[BaseModel] = Recipe
        for part in loc[:-1]:
            model = _section_type(model.model_fields[part].annotation) or model
        return f"unknown key {key!r}{_nearest(loc[-1], model.model_fields, '.'.join(loc[:-1]))}"
    if kind == "missing":
        return f"missing required key {key!r}"
    given = error.get("input")
    message = error.get("msg", "invalid value").replace("Value error, ", "")
    if kind == "value_error":
        return f"{key + ': ' if key else ''}{message}"
    members = [e for e in errors if field_path(e.get("loc", ())) == loc and repr(e.get("input")) == repr(given)]
    expected = "; or ".join(dict.fromkeys(lower_first(e.get("msg", "invalid value")) for e in members))
    shown = given if not isinstance(given, (dict, list)) else type(given).__name__
    return f"{key}: got {shown!r}; {expected}"


def lower_first(text: str) -> str:
    return text[:1].lower() + text[1:]


def field_path(loc: typing.Sequence[Any]) -> list[str]:
    """The recipe keys of an error's location, without the union members and list indices pydantic adds
    after them (`train.max_tokens_per_batch.constrained-int` is `train.max_tokens_per_batch`)."""
    path: list[str] = []
    model: type[BaseModel] | None = Recipe
    for part in loc:
        if model is None:  # past a value's key: a union member's tag, or a list index
            break
        if isinstance(part, int) or part not in model.model_fields:
            continue
        path.append(part)
        model = _section_type(model.model_fields[part].annotation)
    return path


def check_deepspeed(recipe: Recipe, zero_stage: int) -> None:
    """What a recipe cannot do under DeepSpeed: skip an update (the engine applies it inside backward),
    size its batches by trials on the device (auto), and, under ZeRO-3, compile its blocks or shard 4-bit
    weights stored in another dtype than the rest of the model."""
    if recipe.train.on_nonfinite_loss == "skip":
        raise RecipeError("train.on_nonfinite_loss is skip, but DeepSpeed applies the update inside backward, "
                          "before a step can be skipped; use stop under DeepSpeed")
    if recipe.train.max_tokens_per_batch == "auto":
        raise RecipeError("train.max_tokens_per_batch: auto tries batches on the device before DeepSpeed takes the "
                          "model, which ZeRO cannot; give a number of tokens under DeepSpeed")
    if zero_stage == 3:
        check_sharded(recipe, "ZeRO-3")


def check_fsdp(recipe: Recipe, fsdp_version: int) -> None:
    """What a recipe cannot do under FSDP: dsum shards with FSDP2 alone; batches sized by trials on the device
    (auto) would be tried on the model before FSDP shards it, whose weights rank 0 alone then holds; and
    what no sharding of the weights allows (`check_sharded`)."""
    if fsdp_version != 2:
        raise RecipeError(f"fsdp_config.fsdp_version is {fsdp_version} in the Accelerate config; dsum trains with "
                          "FSDP2: set fsdp_version: 2")
    if recipe.train.max_tokens_per_batch == "auto":
        raise RecipeError("train.max_tokens_per_batch: auto tries batches on the device before FSDP shards the "
                          "model; give a number of tokens under FSDP")
    check_sharded(recipe, "FSDP")


def check_sharded(recipe: Recipe, sharding: str) -> None:
    """What a recipe cannot do where `sharding` (ZeRO-3, FSDP) splits the weights across ranks: compile its
    blocks, or shard 4-bit weights packed in another dtype than the rest of the model, which each shard holds
    in one flat tensor of one dtype."""
    if recipe.train.compile:
        raise RecipeError(f"train.compile: not under {sharding}, as torch.compile does not reliably trace the hooks "
                          "that gather its sharded weights; set train.compile: false")
    storage = recipe.quantization.storage_dtype
    if recipe.adapter.method == "qlora" and storage != recipe.model.dtype:
        raise RecipeError(
            f"quantization.storage_dtype is {storage} but {sharding} needs it to equal model.dtype "
            f"({recipe.model.dtype}) to shard the 4-bit weights; set quantization.storage_dtype to the model dtype"
        )


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """The resolved recipe, every default filled in, as a recipe file that validates again (run.json,
    `dsum validate`): the quantization section only where the adapter is QLoRA, the only one to use it."""
    return recipe.model_dump(mode="json", exclude=None if recipe.adapter.method == "qlora" else {"quantization"})
