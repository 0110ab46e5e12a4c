"""`dsum export`: any checkpoint written as a model that transformers (or, for an adapter, peft) loads without
dsum, its adapter merged into its base on request.

    dsum export runs/lora --out exports/lora --merge --dtype bf16
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from dsum import distributed
from dsum.config import RecipeError
from dsum.console import export_closing, export_opening
from dsum.modeling import T5_TYPES, torch_dtype, warn_of_remote_code
from dsum.run_dir import RUN_ENTRIES, written
from dsum.trained import FINAL_LAYOUT, Checkpoint, load_trained, read_checkpoint

# What generate() takes from generation_config.json: the decoding dsum eval uses, so that the export
# generates as the run was evaluated (the prompt is the caller's to build).
GENERATION_KEYS = ("max_new_tokens", "num_beams", "do_sample", "temperature", "top_p", "no_repeat_ngram_size",
                   "pad_token_id", "eos_token_id")


def export(source: Path, out: Path, *, merge: bool, dtype: str | None, base: str | None, overwrite: bool) -> Path:
    """Write `source` (a run's final/, final/ itself, or checkpoints/step-N) into `out`: a full model, a merged
    adapter (`merge`) or the adapter alone, with its tokenizer; `dtype` for a full or merged model's weights
    (default: model.dtype). `out` is written whole or not at all, and replaces what it held only with
    `overwrite`."""
    checkpoint = check_export(source, out, merge=merge, dtype=dtype, base=base, overwrite=overwrite)
    distributed.tell_deepspeed_the_device()  # saving imports DeepSpeed, which would warn that it found no GPU
    started = time.perf_counter()
    whole = merge or checkpoint.method == "none"
    dtype = dtype or checkpoint.recipe.model.dtype
    print(export_opening(source, checkpoint.describe(), out, how(checkpoint, merge, dtype)), flush=True)
    copied = not whole and checkpoint.layout == FINAL_LAYOUT  # peft's files already: no model is loaded
    model, tokenizer = (None, None) if copied else model_to_export(checkpoint, merge=merge, dtype=dtype)
    with written(out, "the export") as tmp:
        if copied:
            copy_adapter(checkpoint, tmp)
        else:
            model.save_pretrained(tmp)  # safetensors
            tokenizer.save_pretrained(tmp)
    print(export_closing(out, time.perf_counter() - started, loader(checkpoint, whole)), flush=True)
    return out


def model_to_export(checkpoint: Checkpoint, *, merge: bool, dtype: str):
    """(model, tokenizer) as they are saved: a full model (an adapter merged in) in `dtype`, generating as the
    run was evaluated; or an adapter saved mid-run, naming its base."""
    model, tokenizer = load_trained(checkpoint, dequantize=merge)
    if merge or checkpoint.method == "none":
        model = (model.merge_and_unload() if merge else model).to(torch_dtype(dtype))
        model.config.use_cache = True  # training with activation checkpointing saved it switched off
        model.generation_config.update(**generation_settings(checkpoint, tokenizer))
    else:  # recorded in adapter_config.json, where AutoPeftModel finds it
        model.peft_config["default"].base_model_name_or_path = str(checkpoint.base)
    return model, tokenizer


def copy_adapter(checkpoint: Checkpoint, out: Path) -> None:
    """final/'s adapter and tokenizer as peft and transformers saved them, its adapter_config.json naming the
    base it goes onto (made absolute, or given with --base), so that a 7B base is never loaded to copy an
    adapter of a few MB."""
    shutil.copytree(checkpoint.path, out)
    config = json.loads((out / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(checkpoint.base)
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def check_export(source: Path, out: Path, *, merge: bool, dtype: str | None, base: str | None,
                 overwrite: bool) -> Checkpoint:
    """Everything `export` reads and writes, checked before anything is loaded or written."""
    checkpoint = read_checkpoint(source, base=base, argument="")
    warn_of_remote_code(checkpoint.recipe)
    if base is not None and checkpoint.base is None:
        raise RecipeError(f"--base: {source} is a full model, which needs no base")
    if merge and checkpoint.method == "none":
        raise RecipeError(f"--merge: {source} is a full model; there is no adapter to merge")
    if dtype is not None and not merge and checkpoint.method != "none":
        raise RecipeError(f"--dtype: {source} holds an adapter, which is exported as it was saved; --dtype sets the "
                          "weights of a full model, or of an adapter merged into its base (add --merge)")
    if dtype == "float16" and checkpoint.config.model_type in T5_TYPES:
        raise RecipeError("--dtype fp16: fp16 overflows in T5 models; use bf16 or fp32")
    check_out(out, checkpoint, overwrite)
    return checkpoint


def check_out(out: Path, checkpoint: Checkpoint, overwrite: bool) -> None:
    """--out: a directory that is empty, missing (then made) or replaced with --overwrite; never one that
    holds or is part of what the export reads (the checkpoint, its base, its run's own entries)."""
    if out.is_file():
        raise RecipeError(f"--out {out} is a file; expected a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise RecipeError(f"--out {out} is not empty; pass --overwrite to replace what it holds, or choose another "
                          "directory")
    target = out.resolve()
    read = [checkpoint.path.resolve(), *([Path(checkpoint.base).resolve()] if is_directory(checkpoint.base) else [])]
    run = checkpoint.run.resolve() if checkpoint.run is not None else None
    if any(overlaps(target, path) for path in read) or (run is not None and (
            run.is_relative_to(target) or (target.is_relative_to(run) and target.relative_to(run).parts[0] in RUN_ENTRIES))):
        raise RecipeError(f"--out {out}: it holds, or is part of, what the export reads ({checkpoint.path}, its base "
                          "or its run); choose another directory")
    existing = next((p for p in (target, *target.parents) if p.exists()), Path("/"))
    if not existing.is_dir():
        raise RecipeError(f"--out {out} cannot be made: {existing} is a file; expected a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RecipeError(f"--out {out}: no permission to write in {existing}; choose another directory")


def is_directory(base: str | None) -> bool:
    return base is not None and Path(base).is_dir()


def overlaps(a: Path, b: Path) -> bool:
    return a.is_relative_to(b) or b.is_relative_to(a)


def how(checkpoint: Checkpoint, merge: bool, dtype: str) -> str:
    """How it is exported, in words, for the opening line."""
    if merge:
        into = "its base dequantised from NF4" if checkpoint.method == "qlora" else "its base"
        return f"merged into {into} ({checkpoint.base}), in {dtype}"
    if checkpoint.method == "none":
        return f"in {dtype}"
    return f"as a PEFT adapter on {checkpoint.base}"


def generation_settings(checkpoint: Checkpoint, tokenizer) -> dict:
    from dsum.generate import generation_kwargs

    settings = generation_kwargs(checkpoint.recipe, tokenizer)
    return {key: settings[key] for key in GENERATION_KEYS if key in settings}


def loader(checkpoint: Checkpoint, whole: bool) -> str:
    """The class that loads the export with `from_pretrained`."""
    task = "Seq2SeqLM" if checkpoint.family == "seq2seq" else "CausalLM"
    return f"AutoModelFor{task}" if whole else f"peft's AutoPeftModelFor{task}"
