"""Tokenizer and model for a recipe: from the Hub, a local path, or built here; with LoRA or QLoRA."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from dsum import prompts
from dsum.config import Recipe, RecipeError
from dsum.run_dir import BASE_DIR, TOKENIZER_DIR, written

log = logging.getLogger(__name__)

T5_TYPES = ("t5", "mt5", "umt5", "longt5")
SPECIAL_TOKENS = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>", "bos_token": "<s>"}


def auto_class(family: str):
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    return AutoModelForSeq2SeqLM if family == "seq2seq" else AutoModelForCausalLM


# ----------------------------------------------------------------------------------------------
# Tokenizer


def warn_of_remote_code(recipe: Recipe) -> None:
    """Said before anything is loaded, so before any of the model's own code runs."""
    if recipe.model.trust_remote_code:
        source = recipe.model.name_or_path or recipe.tokenizer.name_or_path or "the model"
        log.warning("model.trust_remote_code is true: code shipped with %s will run on this machine", source)


def load_tokenizer(recipe: Recipe, output_dir: Path, corpus: Callable[[], Iterable[str]] | None = None, *,
                   cached: bool = True):
    """The recipe's tokenizer. A trained one (tokenizer.train) is read from `<output_dir>/tokenizer/`
    where `cached` and it is there; else it is trained from `corpus()`, on rank 0 and handed to the
    others, and nothing is written: `save_tokenizer` does that once the run holds its directory."""
    if recipe.tokenizer.train:
        cache = output_dir / TOKENIZER_DIR
        if cached and (cache / "tokenizer.json").is_file():
            tokenizer = read_tokenizer(cache)
        elif corpus is None:
            raise RecipeError(f"tokenizer.train: no trained tokenizer in {cache}; train a run there first")
        else:
            tokenizer = shared_trained_tokenizer(recipe, corpus)
    else:
        source = recipe.tokenizer.name_or_path or recipe.model.name_or_path
        tokenizer = read_tokenizer(source, revision=recipe.model.revision,
                                   trust_remote_code=recipe.model.trust_remote_code)
    if tokenizer.pad_token is None:
        # Llama-style tokenizers ship without a pad token; padding is masked, so any id will do.
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer


def read_tokenizer(source: str | Path, **kwargs):
    """AutoTokenizer.from_pretrained, and one line where it fails: a tokenizer that is not there (or out of
    reach), or files that are not what they say (a tokenizer.json cut short, or of another shape)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source, **kwargs)
    except OSError as err:
        raise cannot_load("tokenizer", str(source), err) from None
    except Exception as err:  # noqa: BLE001 - transformers and tokenizers raise what their parsers raise
        raise RecipeError(f"tokenizer: {source} does not read as a tokenizer ({type(err).__name__}: "
                          f"{first_line(err)})") from None


def shared_trained_tokenizer(recipe: Recipe, corpus: Callable[[], Iterable[str]]):
    """A tokenizer trained on rank 0, the same one on every rank."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from dsum import distributed

    trained = train_tokenizer(recipe, corpus()).backend_tokenizer.to_str() if distributed.is_main() else None
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(distributed.gather_objects(trained)[0]),
                                   **SPECIAL_TOKENS)


def save_tokenizer(recipe: Recipe, tokenizer, output_dir: Path) -> None:
    """A trained tokenizer into `<output_dir>/tokenizer/`, where evaluation, a resumed run and every rank read
    it, as they read the random-init base (`materialize_base`)."""
    from dsum import distributed

    cache = output_dir / TOKENIZER_DIR
    if recipe.tokenizer.train and distributed.is_main() and not (cache / "tokenizer.json").is_file():
        with written(cache, "the trained tokenizer") as tmp:
            tokenizer.save_pretrained(tmp)


def train_tokenizer(recipe: Recipe, texts: Iterable[str]):
    """A byte-level BPE tokenizer trained on the given texts plus the prompt template's own words."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=recipe.tokenizer.vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    template = prompts.render(recipe.template, recipe.prompt, "").text
    tokenizer.train_from_iterator(_with_template(texts, template), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **SPECIAL_TOKENS)


def _with_template(texts: Iterable[str], template: str) -> Iterable[str]:
    yield from [template] * 100
    yield from texts


# ----------------------------------------------------------------------------------------------
# Model


def model_config(recipe: Recipe, tokenizer) -> Any:
    """The architecture config: a pretrained model's own, or the recipe's with the tokenizer's ids."""
    from transformers import AutoConfig

    m = recipe.model
    if m.name_or_path is not None:
        try:
            config = AutoConfig.from_pretrained(m.name_or_path, revision=m.revision, trust_remote_code=m.trust_remote_code)
        except OSError as err:
            raise cannot_load("model.name_or_path", m.name_or_path, err) from None
    else:
        arch = m.architecture
        if isinstance(arch, str):
            arch = read_config_file(Path(arch))
        arch = dict(arch)
        from transformers import CONFIG_MAPPING

        model_type = arch.pop("model_type", None)
        if model_type not in CONFIG_MAPPING:
            raise RecipeError(f"model.architecture: unknown model_type {model_type!r}; expected a transformers "
                              "model type such as t5 or llama")
        try:
            config = AutoConfig.for_model(model_type, **arch)
        except Exception as err:  # noqa: BLE001 - transformers' configs validate with errors of their own types
            # huggingface_hub's strict dataclasses wrap the validator's own error, which says what is wrong.
            raise RecipeError(f"model.architecture: {first_line(err.__cause__ or err)}") from None
        vocab = len(tokenizer)
        if getattr(config, "vocab_size", vocab) < vocab or "vocab_size" not in arch:
            config.vocab_size = vocab
        for name in ("pad_token_id", "eos_token_id", "bos_token_id"):
            if name not in arch and getattr(tokenizer, name, None) is not None:
                setattr(config, name, getattr(tokenizer, name))
        if config.is_encoder_decoder and "decoder_start_token_id" not in arch:
            config.decoder_start_token_id = tokenizer.pad_token_id
    check_family(recipe, config)
    return config


def read_config_file(path: Path) -> dict[str, Any]:
    """model.architecture given as a path: a config.json, read whole."""
    if path.is_dir():
        raise RecipeError(f"model.architecture: {path} is a directory; expected the path of a config.json file")
    if not path.is_file():
        raise RecipeError(f"model.architecture: {path}: no such config.json")
    try:
        arch = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise RecipeError(f"model.architecture: {path} is not a JSON config ({first_line(err)})") from None
    if not isinstance(arch, dict) or "model_type" not in arch:
        raise RecipeError(f"model.architecture: {path} holds no model_type; expected a transformers config.json")
    return arch


# A config's sizes that must be positive whole numbers wherever a model has them.
DIMENSIONS = ("vocab_size", "hidden_size", "d_model", "d_ff", "d_kv", "intermediate_size", "num_layers",
              "num_decoder_layers", "num_hidden_layers", "num_heads", "num_attention_heads", "num_key_value_heads",
              "head_dim")


def check_buildable(recipe: Recipe, config: Any) -> None:
    """The architecture's sizes, then the model built on the meta device with its adapter, at no memory:
    sizes a model cannot take (zero heads, heads that do not divide the width) and a LoRA target the
    model lacks are refused before anything is written."""
    field = "model.architecture" if recipe.model.architecture is not None else "model.name_or_path"
    sizes = {name: getattr(config, name) for name in DIMENSIONS if getattr(config, name, None) is not None}
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise RecipeError(f"{field}: {name} is {value!r}; expected a whole number of at least 1")
    width, heads = sizes.get("hidden_size"), sizes.get("num_attention_heads")
    if width and heads and "head_dim" not in sizes and width % heads:
        raise RecipeError(f"{field}: hidden_size {width} is not a multiple of num_attention_heads {heads}")
    if heads and sizes.get("num_key_value_heads") and heads % sizes["num_key_value_heads"]:
        raise RecipeError(f"{field}: num_attention_heads {heads} is not a multiple of num_key_value_heads "
                          f"{sizes['num_key_value_heads']}")
    try:
        meta_model(recipe, config)
    except RecipeError:
        raise
    except Exception as err:  # noqa: BLE001 - a model's constructor raises what its code raises
        raise RecipeError(f"{field}: the model cannot be built from it ({type(err).__name__}: {first_line(err)})") from None


def config_family(config: Any) -> str:
    """The model family a transformers config describes."""
    return "seq2seq" if getattr(config, "is_encoder_decoder", False) else "causal"


def check_family(recipe: Recipe, config: Any) -> None:
    family = config_family(config)
    if family != recipe.model.family:
        raise RecipeError(f"model.family: {recipe.model.family!r} does not match the {config.model_type} architecture ({family})")
    if config.model_type in T5_TYPES and "float16" in (recipe.model.dtype, recipe.train.mixed_precision.replace("fp16", "float16")):
        raise RecipeError("train.mixed_precision / model.dtype: fp16 overflows in T5 models; use bf16 or fp32")


def check_packing(recipe: Recipe, config: Any) -> None:
    """train.packing needs a model that takes position_ids and masks attention by them (transformers'
    shared causal mask does when there is no attention mask, and flash attention reads them)."""
    if not recipe.train.packing:
        return
    import inspect
    import sys

    try:
        with torch.device("meta"):  # the class transformers picks for this config, built without memory
            model_class = type(auto_class(recipe.model.family).from_config(config))
    except ValueError:  # code shipped with the model: nothing to inspect
        raise RecipeError(f"train.packing: cannot tell whether the {config.model_type} architecture keeps packed "
                          "examples apart; set train.packing: false") from None
    takes_positions = "position_ids" in inspect.signature(model_class.forward).parameters
    if not (takes_positions and "create_causal_mask" in vars(sys.modules[model_class.__module__])):
        raise RecipeError(f"train.packing: {model_class.__name__} cannot keep packed examples apart (it takes no "
                          "position_ids); set train.packing: false and use train.group_by_length")


def training_attention(recipe: Recipe, device_type: str) -> str | None:
    """The attention a run trains with: model.attn_implementation where the recipe sets it; else, for
    packed rows on a GPU, one that keeps the examples of a row apart without a row x row mask:
    flash_attention_2 where flash-attn is installed (it reads the boundaries from position_ids, and
    takes bf16 or fp16), else FlexAttention, in torch, with a block-sparse document mask. None:
    transformers' own choice (sdpa), which masks a packed row with a mask of row x row."""
    import importlib.util

    if recipe.model.attn_implementation or not recipe.train.packing or device_type != "cuda":
        return recipe.model.attn_implementation
    half = recipe.model.dtype != "float32" or recipe.train.mixed_precision != "no"
    return "flash_attention_2" if half and importlib.util.find_spec("flash_attn") else "flex_attention"


def restore_attention(model) -> None:
    """Give a model trained with `training_attention`'s choice back the attention transformers picks by
    default (sdpa where the model has it), for generation: FlexAttention would compile anew for every
    length of the KV cache."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.set_attn_implementation("sdpa" if getattr(base, "_supports_sdpa", False) else "eager")


def logits_for_targets_only(model) -> bool:
    """Whether a causal model can run its output head at chosen positions alone: its forward takes a
    (rows, positions) tensor in `logits_to_keep` (transformers' `slice_logits_to_keep`). The loss is the
    same; the head's FLOPs over the prompt and their logits' memory are saved."""
    import inspect
    import sys

    if model.config.is_encoder_decoder:  # the decoder only ever sees the targets
        return False
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # under a PEFT wrapper
    try:
        from transformers.modeling_utils import slice_logits_to_keep

        kept = slice_logits_to_keep(torch.arange(3.0).reshape(1, 3, 1), torch.tensor([[2, 0]]))
        by_position = kept.flatten().tolist() == [2.0, 0.0]
    except (ImportError, IndexError, RuntimeError):  # a transformers without positions per row
        return False
    forward = type(base).forward
    return (by_position and "logits_to_keep" in inspect.signature(forward).parameters
            and vars(sys.modules[forward.__module__]).get("slice_logits_to_keep") is slice_logits_to_keep)


def materialize_base(recipe: Recipe, config: Any, output_dir: Path) -> Path:
    """Write a randomly initialised base to `<output_dir>/base` (seeded by train.seed) unless it is there. It is
    always loaded from there, so that adapters, resumed runs and every rank see the same weights. The draws
    are made on a fork of torch's generator: the rank that writes the base and the ranks that read it go on
    from the same random state (an adapter's initial weights, under FSDP, are each rank's own)."""
    base = output_dir / BASE_DIR
    if not (base / "config.json").is_file():
        with torch.random.fork_rng(devices=[]):  # the device's generator is not drawn from here
            torch.manual_seed(recipe.train.seed)
            model = auto_class(recipe.model.family).from_config(config, dtype=torch_dtype(recipe.model.dtype))
        with written(base, "the random-init base") as tmp:
            model.save_pretrained(tmp)
    return base


def load_model(recipe: Recipe, source: str | Path, *, for_training: bool = True, attention: str | None = None):
    """Load the base from `source` (Hub id or path), quantized for QLoRA, wrapped in LoRA if asked;
    `attention` in place of model.attn_implementation (see `training_attention`)."""
    kwargs: dict[str, Any] = {
        "dtype": torch_dtype(recipe.model.dtype),
        "revision": recipe.model.revision if recipe.model.name_or_path else None,
        "trust_remote_code": recipe.model.trust_remote_code,
    }
    if attention or recipe.model.attn_implementation:
        kwargs["attn_implementation"] = attention or recipe.model.attn_implementation
    if recipe.adapter.method == "qlora":
        kwargs["quantization_config"] = bnb_config(recipe)
    from safetensors import SafetensorError

    try:
        model = auto_class(recipe.model.family).from_pretrained(source, **kwargs)
    except (OSError, SafetensorError) as err:  # not there, or a weights file cut short (a copy that did not finish)
        raise cannot_load("model", str(source), err) from None
    if for_training:
        model = prepare_for_training(recipe, model)
    return model


def prepare_for_training(recipe: Recipe, model):
    checkpointing = recipe.train.gradient_checkpointing
    if recipe.adapter.method == "qlora":
        from peft import prepare_model_for_kbit_training

        # Checkpointing is switched on below, by its current name, rather than by peft's call of the old one.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        keep_4bit_layout(model)
    if checkpointing:
        enable_activation_checkpointing(model)
    if recipe.adapter.method != "none":
        model = add_lora(recipe, model)
        if checkpointing:
            model.enable_input_require_grads()
    return model


def keep_4bit_layout(model) -> None:
    """On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit weight in place, for inference, the first time a
    forward in eval mode sees it (a validation), and marks its quant state repacked: training on after it
    reads the weights wrong, and under FSDP the repacked weight is a gathered copy that the next reshard drops
    while the mark stays. A model in training keeps the layout it was quantized in."""
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False


def enable_activation_checkpointing(model) -> None:
    """Recompute each layer's activations in the backward pass (non-reentrant: it works with frozen inputs)."""
    options = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers' name since 5.x; the old one warns
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
    model.config.use_cache = False


def add_lora(recipe: Recipe, model):
    from peft import LoraConfig, TaskType, get_peft_model

    a = recipe.adapter
    config = LoraConfig(
        task_type=TaskType.SEQ_2_SEQ_LM if recipe.model.family == "seq2seq" else TaskType.CAUSAL_LM,
        r=a.r,
        lora_alpha=a.alpha,
        lora_dropout=a.dropout,
        target_modules=a.target_modules,
        bias=a.bias,
    )
    try:
        return get_peft_model(model, config)
    except ValueError as err:
        raise RecipeError(f"adapter.target_modules: {first_line(err)}") from None


def bnb_config(recipe: Recipe):
    from transformers import BitsAndBytesConfig

    q = recipe.quantization
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_compute_dtype=torch_dtype(q.compute_dtype),
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_quant_storage=getattr(torch, q.storage_dtype),
    )


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameters; 4-bit weights count as the values they hold, not the bytes."""
    trainable = total = 0
    for param in model.parameters():
        n = param.ds_numel if hasattr(param, "ds_numel") else param.numel()
        if param.__class__.__name__ == "Params4bit":
            n = n * 2 * param.element_size()  # bitsandbytes packs two 4-bit values per byte
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total


def describe_parameters(model) -> str:
    trainable, total = count_parameters(model)
    return f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.2f}%)"


def meta_model(recipe: Recipe, config: Any):
    """The architecture with LoRA applied, on the meta device: parameter counts without memory."""
    with torch.device("meta"):
        model = auto_class(recipe.model.family).from_config(config)
        return add_lora(recipe, model) if recipe.adapter.method != "none" else model


def torch_dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def cannot_load(field: str, source: str, err: Exception) -> RecipeError:
    """The one-line error for a tokenizer or model that does not load. Where the Hub could not be
    reached, it says how to fail at once next time: without a cached copy, huggingface_hub retries a
    network error with backoff (about 25 s a file) before giving up."""
    from huggingface_hub import constants

    message = f"{field}: cannot load {source!r} ({first_line(err)})"
    if "couldn't connect" in str(err) and not constants.HF_HUB_OFFLINE:
        message += "; without internet, give a local directory, or set HF_HUB_OFFLINE=1 to use the Hub cache alone"
    return RecipeError(message)


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__

