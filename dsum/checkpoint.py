"""Checkpoints: atomic save, resume from the newest complete one, and the final export (`final/`, what users
load)."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dsum import distributed, faults
from dsum.config import RecipeError, RunError
from dsum.run_dir import (CHECKPOINTS, FINAL, MARKER, STATE_FILE, checkpoint_path, complete_checkpoints, write_failure,
                          written)

def resolve_resume(output_dir: Path, resume: str) -> Path:
    """The checkpoint that `--resume latest` or `--resume PATH` names."""
    if resume == "latest":
        found = complete_checkpoints(output_dir)
        if not found:
            raise RecipeError(f"--resume latest: no complete checkpoint in {output_dir / CHECKPOINTS}")
        return found[-1]
    path = Path(resume)
    if not path.is_dir():
        raise RecipeError(f"--resume {resume}: no such directory")
    if not (path / STATE_FILE).is_file() or not (path / MARKER).is_file():
        raise RecipeError(f"--resume {resume}: not a complete dsum checkpoint (expected {STATE_FILE} and {MARKER})")
    return path


def verified(path: Path) -> Path:
    """The checkpoint, once every file a resume will read is there and whole; else one line naming the
    file, before anything is written. The COMPLETE marker lists each file and its size (checkpoints
    from before it did are checked by their contents alone); a JSON file must parse, a safetensors
    file hold every byte its header promises, a torch file (optimizer, scheduler, RNG state) open as
    the zip archive torch writes, and no file be empty."""
    for name, size in listed_files(path).items():
        file = path / name
        if not file.is_file():
            damaged(path, f"{name} is missing")
        if file.stat().st_size != size:
            damaged(path, f"{name} holds {file.stat().st_size:,} bytes, {size:,} when it was saved")
    for file in sorted(p for p in path.rglob("*") if p.is_file() and p.name != MARKER):
        problem = file_problem(file)
        if problem:
            damaged(path, f"{file.relative_to(path)} {problem}")
    state = json.loads((path / STATE_FILE).read_text())
    if not isinstance(state, dict) or not isinstance(state.get("global_step"), int):
        damaged(path, f"{STATE_FILE} holds no global_step")
    if not isinstance(state.get("recipe", {}), dict):  # what the resume contract compares with
        damaged(path, f"{STATE_FILE} holds a recipe that is not a mapping")
    return path


def damaged(path: Path, why: str):
    raise RecipeError(f"--resume {path}: the checkpoint is damaged ({why}); resume from an earlier one with "
                      "--resume PATH")


def manifest(directory: Path) -> dict[str, int]:
    """Every file of a checkpoint and its size in bytes, by its path within the checkpoint."""
    return {str(p.relative_to(directory)): p.stat().st_size for p in sorted(directory.rglob("*")) if p.is_file()}


def listed_files(path: Path) -> dict[str, int]:
    """The files the COMPLETE marker lists; none where it is empty (written before it listed them)."""
    text = (path / MARKER).read_text().strip()
    if not text:
        return {}
    try:
        listed = json.loads(text)
    except ValueError:
        listed = None
    if not isinstance(listed, dict):
        damaged(path, f"{MARKER} is not the list of files it should be")
    return listed


def file_problem(file: Path) -> str | None:
    """What is wrong with one checkpoint file, judged by its kind, or None."""
    import zipfile

    size = file.stat().st_size
    if size == 0:
        return "is empty"
    if file.suffix == ".json":
        try:
            json.loads(file.read_text())
        except (ValueError, UnicodeDecodeError):
            return "is not valid JSON"
    elif file.suffix == ".safetensors":
        return safetensors_problem(file, size)
    elif file.suffix in (".bin", ".pt", ".pth", ".pkl"):
        try:
            with zipfile.ZipFile(file) as archive:
                archive.namelist()
        except (zipfile.BadZipFile, OSError):
            return "is cut short, or not a file torch saved"
    return None


def safetensors_problem(file: Path, size: int) -> str | None:
    """A safetensors file is 8 bytes of header length, the JSON header, then the tensors' bytes."""
    with file.open("rb") as f:
        length = int.from_bytes(f.read(8), "little")
        try:
            tensors = json.loads(f.read(length)) if 8 + length <= size else None
        except (ValueError, UnicodeDecodeError):
            tensors = None
    if not isinstance(tensors, dict):
        return "has no readable safetensors header"
    end = max((t["data_offsets"][1] for name, t in tensors.items() if name != "__metadata__"), default=0)
    return f"is cut short: {size:,} bytes of {8 + length + end:,}" if size < 8 + length + end else None


def saved_state(path: Path) -> dict[str, Any]:
    """What a checkpoint records besides the weights (its trainer_state.json): the step, the batch layout."""
    return json.loads((path / STATE_FILE).read_text())


def save_checkpoint(accelerator, output_dir: Path, state: dict[str, Any], keep: int) -> Path:
    """Save on every rank into a temporary directory, then complete and rename it on rank 0.

    The checkpoint is written into `checkpoints/step-N.tmp`, completed with a `COMPLETE` marker, then renamed
    to `checkpoints/step-N`; a kill mid-save leaves only a `.tmp` that resume ignores. It holds Accelerate's
    state (model, optimizer, scheduler; DeepSpeed shards under ZeRO), one RNG file per rank, and
    `trainer_state.json` with the step to continue from.

    A write error on any rank (a full disk, a lost mount) is agreed on by all of them: the partial
    directory is removed, the earlier checkpoints stay, and the run stops with `RunError`.
    """
    final = checkpoint_path(output_dir, state["global_step"])
    tmp = final.with_name(final.name + ".tmp")
    error = None
    try:
        if distributed.is_main():
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        distributed.barrier()
        hook = accelerator.register_save_state_pre_hook(keep_tied_weights_once)
        try:
            accelerator.save_state(str(tmp))
        finally:
            hook.remove()
        faults.point("checkpoint.save", state["global_step"])  # half written: no marker, not renamed
        torch.save(rng_state(), tmp / f"rng_state_{distributed.rank()}.pt")
        if distributed.is_main():
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
    except Exception as err:  # noqa: BLE001 - a full disk raises OSError, safetensors its own error
        error = err
    (failed,) = distributed.sum_all([error is not None])
    if failed:
        if distributed.is_main():
            shutil.rmtree(tmp, ignore_errors=True)
        kept = complete_checkpoints(output_dir)
        why = write_failure(error) if error is not None else "a write error on another rank"
        previous = f"the last complete checkpoint, {kept[-1].name}, is intact" if kept else "no earlier checkpoint"
        raise RunError(f"could not save the checkpoint of step {state['global_step']} in {tmp.parent}: {why}; {previous}")
    if distributed.is_main():
        (tmp / MARKER).write_text(json.dumps(manifest(tmp), indent=1) + "\n")  # what a resume checks is there
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in complete_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    distributed.barrier()
    return final


def keep_tied_weights_once(models, weights: list[dict[str, Any]], output_dir: str) -> None:
    """Each tied weight saved under one name, as transformers saves a model: T5's embeddings and head are one
    tensor, which a LoRA model's state dict lists under four names. safetensors' `load_model` ties the others
    back on resume. Accelerate would drop them too, but with a warning that asks the user to check."""
    for state in weights:
        seen = set()
        for name, tensor in list(state.items()):
            if not isinstance(tensor, torch.Tensor):
                continue
            view = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.shape,
                    tensor.stride(), tensor.dtype)
            if view in seen:  # the very same tensor: partial overlaps are kept, and warned of, as before
                del state[name]
            seen.add(view)


def load_checkpoint(accelerator, path: Path) -> dict[str, Any]:
    state = json.loads((path / STATE_FILE).read_text())
    accelerator.load_state(str(path))
    rng = path / f"rng_state_{distributed.rank()}.pt"
    if not rng.is_file():
        raise RecipeError(f"--resume {path}: no RNG state for rank {distributed.rank()}; was it saved with fewer processes?")
    set_rng_state(torch.load(rng, weights_only=True))
    return state


def rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_as_tuples(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuples(value: Any) -> Any:
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def save_final(accelerator, model, tokenizer, output_dir: Path) -> Path:
    """Write `final/`, what users load: safetensors of the full model (consolidated under ZeRO-3) or the LoRA
    adapter, and the tokenizer beside it."""
    final = output_dir / FINAL
    state_dict = gathered_state_dict(accelerator, model)  # every rank takes part: ZeRO-3 and FSDP gather here
    if distributed.is_main():
        with written(final, "final/") as tmp:
            accelerator.unwrap_model(model).save_pretrained(tmp, state_dict=state_dict)  # safetensors
            tokenizer.save_pretrained(tmp)
    distributed.barrier()
    return final


def gathered_state_dict(accelerator, model) -> dict[str, Any]:
    """The whole model's weights on rank 0 (every rank takes part), as `save_pretrained` takes them. Under
    FSDP an adapter's frozen base is not gathered (final/ holds the adapter alone), and the names of one
    tied weight, gathered as separate tensors, are given one tensor again, so that `save_pretrained`
    keeps one copy, as it does for a model that was never sharded."""
    if not distributed.fsdp_sharded(model):
        return accelerator.get_state_dict(model)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    adapter = hasattr(model, "peft_config")
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=adapter)
    state_dict = get_model_state_dict(model, options=options)  # rank 0 holds it; the others, nothing
    first_name = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        first = first_name.setdefault(param, name)
        if name in state_dict and first in state_dict:
            state_dict[name] = state_dict[first]
    return state_dict
