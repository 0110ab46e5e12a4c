"""Batched generation sharded over every process, gathered back into dataset order, resumable from what an
interrupted evaluation wrote."""

from __future__ import annotations

import functools
import json
import math
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch

from dsum import cpu_speed, distributed, faults
from dsum.config import EvalConfig, Recipe, RecipeError, RunError
from dsum.data import Example
from dsum.data.sources import text_lines
from dsum.features import Featurizer, pad
from dsum.preemption import Stopped, StopSignals

PARTIAL_DIR = "partial"


@dataclass
class Prediction:
    id: str
    prediction: str
    references: list[str]
    prompt_tokens: int
    generated_tokens: int

    def as_dict(self) -> dict:
        return asdict(self)


def plan_batches(prompt_lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Example indices per batch of `eval.batch_size`, longest prompts first (similar lengths, little padding, and
    memory runs out on the first batch if it will); independent of the number of processes."""
    order = sorted(range(len(prompt_lengths)), key=lambda i: (-prompt_lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def read_partial(partial_dir: Path) -> dict[str, Prediction]:
    """Predictions already written by an earlier, interrupted evaluation (any number of ranks)."""
    done: dict[str, Prediction] = {}
    for path in sorted(partial_dir.glob("rank-*.jsonl")):
        for line in text_lines(path.read_text(encoding="utf-8")):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by the interruption; that dialogue is generated again
            done[row["id"]] = Prediction(**row)
    return done


@torch.no_grad()
def generate_predictions(recipe: Recipe, model, tokenizer, examples: Sequence[Example], device, *,
                         synced_gpus: bool = False, autocast=nullcontext, partial_dir: Path | None = None,
                         progress: bool = False, shots: Sequence[Example] = (),
                         stop: StopSignals | None = None) -> list[Prediction]:
    """Predictions for every example, in dataset order, on every rank.

    The batches are the same whatever the number of processes; rank r generates batches r, r + world_size, ...
    So the predictions are the same with 1, 2 or 3 processes. Every rank makes the same number of `generate`
    calls, which ZeRO-3 (`synced_gpus`) needs: a rank that runs out repeats a batch and drops the result. Causal
    prompts are left-padded and the prompt is cut from the output.

    Each rank appends finished predictions to `partial/rank-R.jsonl` as it goes; a restarted evaluation reads
    them back and generates only what is missing. With `stop`, the ranks agree after each batch whether one of
    them got SIGUSR1 or SIGTERM; if so, what is written to `partial_dir` stays and `Stopped` is raised.
    """
    check_generation(recipe.eval, model, synced_gpus)
    done = read_partial(partial_dir) if partial_dir is not None else {}
    distributed.barrier()  # every rank has read what is done before any rank appends to it
    todo = [e for e in examples if e.id not in done]
    featurizer = Featurizer(recipe, tokenizer, shots=shots)
    prompt_ids = featurizer.prompts_ids([e.dialogue for e in todo])
    batches = plan_batches([len(p) for p in prompt_ids], recipe.eval.batch_size)
    world, rank = distributed.world_size(), distributed.rank()
    mine = batches[rank::world]
    calls = math.ceil(len(batches) / world)
    left = recipe.model.family == "causal"
    sink = None
    if partial_dir is not None:
        partial_dir.mkdir(parents=True, exist_ok=True)
        sink = (partial_dir / f"rank-{rank}.jsonl").open("a", encoding="utf-8")
    from tqdm.auto import tqdm

    model.eval()
    kwargs = generation_kwargs(recipe, tokenizer)
    results: list[Prediction] = []
    fitting = [recipe.eval.batch_size]  # rows per generate call: halved on out-of-memory, for the rest of the run
    encoder_batch = cpu_speed.encoder_batch(recipe.eval, device, synced_gpus)
    for call in tqdm(range(calls), desc="generate", disable=not (progress and distributed.is_main()), dynamic_ncols=True):
        # Every rank makes every call, so every rank votes here: stop together, between batches.
        if stop is not None and distributed.sum_all([stop.vote()])[0]:
            if sink is not None:
                sink.close()
            raise Stopped(f"stopped on {stop.by} after {call} of {calls} batches; the predictions so far are in "
                          f"{partial_dir}; run the same command to continue", by=stop.by)
        repeat = call >= len(mine)  # out of work, but ZeRO-3 needs every rank in every forward pass
        ids = mine[call] if not repeat else batches[0]
        rows = [prompt_ids[i] for i in ids]
        input_ids = pad(rows, tokenizer.pad_token_id, left=left).to(device)
        attention_mask = pad([[1] * len(r) for r in rows], 0, left=left).to(device)
        with autocast(), distributed.whole_root(model):
            output = generate_fitting(model, input_ids, attention_mask, kwargs, synced_gpus, fitting, encoder_batch)
        if repeat:
            continue
        if left:
            output = output[:, input_ids.shape[1] :]
        for i, row, tokens in zip(ids, rows, output.tolist()):
            tokens = strip_padding(tokens, tokenizer)
            prediction = Prediction(
                id=todo[i].id,
                prediction=tokenizer.decode(tokens, skip_special_tokens=True).strip(),
                references=list(todo[i].references),
                prompt_tokens=len(row),
                generated_tokens=len(tokens),
            )
            results.append(prediction)
            if sink is not None:
                sink.write(json.dumps(prediction.as_dict(), ensure_ascii=False) + "\n")
        if sink is not None:
            sink.flush()
        faults.point("generate.batch", call + 1)
    if sink is not None:
        sink.close()
    gathered = dict(done)
    for shard in distributed.gather_objects(results):
        gathered.update((p.id, p) for p in shard)
    return [gathered[e.id] for e in examples]


def generate_fitting(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, kwargs: dict, synced_gpus: bool,
                     fitting: list[int], encoder_batch: int | None = None) -> torch.Tensor:
    """`model.generate` on the batch, in slices of at most `fitting[0]` rows; on out-of-memory the slice is halved
    (and stays halved for the rest) instead of failing, but not under ZeRO-3, whose ranks move in step. The rows
    keep the batch's padding, so each row's prompt is the same whatever the slice, and the outputs are padded back
    into one tensor. With `encoder_batch` (seq2seq, on a CPU), the encoder runs apart first
    (`cpu_speed.encode_in_parts`)."""
    outputs, start = [], 0
    while start < len(input_ids):
        rows = slice(start, start + fitting[0])
        try:
            if encoder_batch is None:
                prompt = {"input_ids": input_ids[rows]}
            else:
                prompt = {"encoder_outputs": cpu_speed.encode_in_parts(model, input_ids[rows], attention_mask[rows],
                                                                        encoder_batch)}
            if "cache_implementation" not in kwargs:  # eval.cache: dynamic
                prompt[cache_argument()] = cpu_speed.growing_cache(model, input_ids.device)
            outputs.append(model.generate(**prompt, attention_mask=attention_mask[rows], **kwargs,
                                          synced_gpus=synced_gpus))
        except torch.OutOfMemoryError:
            if synced_gpus or fitting[0] == 1:  # ZeRO-3 ranks must make the same calls: no back-off there
                raise RunError(f"out of memory generating {fitting[0]} dialogue(s) at once; lower eval.batch_size "
                               "or eval.max_new_tokens") from None
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            fitting[0] //= 2
            print(f"dsum: out of memory; generating {fitting[0]} dialogue(s) at a time from here on", flush=True)
            continue
        start += fitting[0]
    width = max(o.shape[1] for o in outputs)
    pad_id = kwargs["pad_token_id"]
    return torch.cat([torch.nn.functional.pad(o, (0, width - o.shape[1]), value=pad_id) for o in outputs])


def generation_kwargs(recipe: Recipe, tokenizer) -> dict:
    e = recipe.eval
    kwargs = {
        "max_new_tokens": e.max_new_tokens,
        "num_beams": e.num_beams,
        "do_sample": e.do_sample,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    if e.do_sample:
        kwargs.update(temperature=e.temperature, top_p=e.top_p)
    if e.no_repeat_ngram_size:
        kwargs["no_repeat_ngram_size"] = e.no_repeat_ngram_size
    return {**kwargs, **cache_kwargs(e)}


def cache_kwargs(e: EvalConfig) -> dict:
    """`eval.cache` and `eval.compile` as `generate` takes them.

    `eval.cache: static` allocates each batch's KV cache at its full length up front instead of growing it token
    by token; the predictions are the same. transformers compiles the decoding step of a static cache by itself,
    but only on CUDA: here `eval.compile` alone decides, on any device. The first batch waits for compilation,
    and new shapes compile again (a smaller last batch, a seq2seq batch's prompt length) until torch.compile
    takes the size as variable.
    """
    if e.cache == "dynamic":
        return {}
    if not e.compile:
        return {"cache_implementation": "static", "disable_compile": True}  # else CUDA compiles it anyway
    from transformers import CompileConfig

    compile_config = CompileConfig()
    compile_config._compile_all_devices = True  # else only CUDA-like devices compile
    return {"cache_implementation": "static", "compile_config": compile_config}


@functools.cache
def cache_argument() -> str:
    """What `generate` calls a KV cache given to it: `cache` from transformers 5.24 (which warns at the old
    name), `past_key_values` before."""
    import transformers
    from packaging.version import Version

    return "cache" if Version(transformers.__version__) >= Version("5.24") else "past_key_values"


def check_generation(e: EvalConfig, model, synced_gpus: bool) -> None:
    """Refuse what `generate` would fail at, or silently not do, with `eval.cache` and `eval.compile`, before
    anything is generated (and by `dsum train` before it trains, when it will generate).

    Refused: a static cache for a model class that transformers does not mark as compilable, compiling a
    quantized base (transformers would silently not), and compiling under ZeRO-3 (torch.compile does not
    reliably trace the hooks that gather each layer's weights; pytorch/pytorch#115484). A static cache under
    ZeRO-3 works: a rank that has finished keeps decoding until all have, but no rank decodes more than
    `eval.max_new_tokens` steps, which its cache holds.
    """
    # transformers marks no static-cache support; its own tests take this flag for it.
    if e.cache == "static" and not getattr(model, "_can_compile_fullgraph", False):
        name = type(model.get_base_model() if hasattr(model, "get_base_model") else model).__name__
        raise RecipeError(f"eval.cache: static: {name} does not support a static KV cache; use eval.cache: dynamic")
    if not e.compile:
        return
    if synced_gpus:
        raise RecipeError("eval.compile: not under ZeRO-3, as torch.compile does not reliably trace the hooks that "
                          "gather its sharded weights; set eval.compile: false (eval.cache: static works there)")
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and not quantizer.is_compileable:
        raise RecipeError("eval.compile: transformers does not compile this quantized base (it would generate "
                          "uncompiled); set eval.compile: false")


def strip_padding(tokens: list[int], tokenizer) -> list[int]:
    """Generated tokens up to and including the first EOS, without the seq2seq start token."""
    start = tokens[1:] if tokens and tokens[0] == tokenizer.pad_token_id else tokens
    if tokenizer.eos_token_id in start:
        start = start[: start.index(tokenizer.eos_token_id) + 1]
    return [t for t in start if t != tokenizer.pad_token_id]
