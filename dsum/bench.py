"""`dsum bench`: how fast dsum fine-tunes and evaluates, next to the two usual ways of doing it.

    dsum bench --json bench.json --data PATH_TO_DIALOGSUM
    dsum bench --device cuda --json bench-gpu.json --data PATH_TO_DIALOGSUM
    dsum bench --device cuda --record --profile profiles --data PATH_TO_DIALOGSUM

On each model (the same random-init weights), the same DialogSum data and the same machine, in one
process, three ways train and then generate summaries:

  notebook    the popular course notebook: `transformers.Trainer` on examples padded to 512 tokens,
              inputs and labels alike, in random order; evaluation generates one row at a time over
              the flattened test split (each dialogue once per reference: 3 rows a dialogue).
  no_trainer  transformers' `run_summarization_no_trainer` example: a plain Accelerate loop over
              batches padded to their longest row (`DataCollatorForSeq2Seq`, labels padded with
              -100), in random order; batched generation over the same flattened rows in dataset order.
  dsum        `dsum.train.train` with its speed settings (`DSUM_SPEED`), and
              `dsum.generate.generate_predictions` over the unique dialogues with a large batch;
              `--dsum KEY=VALUE` changes one of its own settings (`DSUM_OPTIONS`) for an A/B run.

All three read the same token ids (dsum's Featurizer: one prompt, truncation at 512 source and 128
target tokens), train the same model with AdamW at the same learning rate and precision, and
generate the same number of tokens with the same settings. Training speed is real (non-padding)
tokens per second over the same number of optimizer steps after a warm-up; evaluation speed is test
dialogues per second. Both are timed in rounds that take the three ways in turn. BENCHMARKS.md explains
each choice. `--profile DIR` profiles a few timed steps of each way's first round (dsum.profiling);
`--record` writes the JSON under benchmarks/results/, named by date, device, kind and commit.
"""

from __future__ import annotations

import copy
import functools
import gc
import json
import math
import os
import platform
import random
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from dsum.config import DataConfig, Recipe, RecipeError, apply_override, read_yaml, validate_recipe
from dsum.distributed import tell_deepspeed_the_device
from dsum.profiling import Schedule, StepProfiler, brief
from dsum.run_info import source_checkout

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
WAYS = ("notebook", "no_trainer", "dsum")
RESULTS = Path("benchmarks") / "results"  # where --record writes, from the current directory (a dsum checkout)


# ----------------------------------------------------------------------------------------------
# Settings: the one place that says how big the bench is and how each way is set up


@dataclass(frozen=True)
class Sizes:
    """Everything the bench's duration depends on, per device."""

    train_examples: int | None  # the first N training dialogues, the same for every way (None: all 12,460)
    warmup_steps: int  # optimizer steps every way runs before its clock starts (at least 1)
    train_steps: int  # optimizer steps timed, the same number in every way
    eval_dialogues: int  # the first N test dialogues, in every way
    notebook_rows: int  # flattened rows the notebook way generates one at a time; the rest is extrapolated
    # dsum's generation settings per model family: eval.batch_size (dialogues per generate call) and, for
    # seq2seq, eval.encoder_batch_size. The other ways call `generate` themselves and read neither.
    dsum_generation: dict[str, dict[str, int]]
    max_new_tokens: int  # every way generates this many tokens a row (random weights rarely stop sooner)
    eval_dtype: str  # the weights every way generates with
    # Training and evaluation are timed in rounds, every way in turn in each, so that a slow spell on the
    # machine falls on every way instead of on one. Training: each round trains afresh from the base with
    # its own seed (other batches), the timed steps split between the rounds. Evaluation: the notebook's
    # rows and no_trainer's batches split between the rounds, dsum's whole pass repeated.
    train_rounds: int = 3
    eval_rounds: int = 3
    no_trainer_eval_batch: int = 8  # the example script's default per_device_eval_batch_size
    max_source_length: int = 512  # the notebook's and the script's truncation, and dsum recipes'
    max_target_length: int = 128
    vocab_size: int = 8000  # the tokenizer trained on the training split: DialogSum-like token lengths
    seed: int = 42


# 2 cores, under 10 minutes for everything (5.5 to 7 on a quiet machine): small models, 2,000 training
# dialogues, all 500 test dialogues. T5 generates 128 dialogues a call, its encoder taking 16 at a time
# (faster on 2 cores than 64 in one encoder pass; BENCHMARKS.md).
CPU_SIZES = Sizes(train_examples=2000, warmup_steps=2, train_steps=18, eval_dialogues=500, notebook_rows=128,
                  dsum_generation={"seq2seq": {"batch_size": 128, "encoder_batch_size": 16},
                                   "causal": {"batch_size": 64}},
                  max_new_tokens=32, eval_dtype="float32")
# One GPU: the whole training split and all 500 test dialogues (1,500 flattened rows).
CUDA_SIZES = Sizes(train_examples=None, warmup_steps=3, train_steps=18, eval_dialogues=500, notebook_rows=60,
                   dsum_generation={"seq2seq": {"batch_size": 64}, "causal": {"batch_size": 64}},
                   max_new_tokens=64, eval_dtype="bfloat16")
SIZES = {"cpu": CPU_SIZES, "cuda": CUDA_SIZES}


@dataclass(frozen=True)
class ModelSpec:
    """A model to bench: a random-init architecture (nothing can be downloaded) and the dsum recipe
    settings every way uses (batch size, accumulation, learning rate, precision, LoRA/QLoRA)."""

    name: str
    architecture: dict[str, Any]  # a transformers config with model_type; without vocab_size, the tokenizer's
    recipe: dict[str, Any] | str  # inline settings, or a file under recipes/ whose settings are taken
    untied_head: bool = False  # T5 v1.1 / FLAN-T5 keep their LM head apart from the embeddings
    parameters: int | None = None  # as the real checkpoint has them (checked on the meta device in the tests)


def cpu_recipe(family: str) -> dict[str, Any]:
    return {
        "model": {"family": family, "dtype": "float32"},
        "adapter": {"method": "none"},
        "train": {"per_device_batch_size": 8, "gradient_accumulation_steps": 1, "learning_rate": 1e-4,
                  "weight_decay": 0.01, "max_grad_norm": 1.0, "mixed_precision": "no"},
    }


# FLAN-T5's shape (gated GELU, relative attention, untied head) and Llama's, small enough for 2 cores.
CPU_MODELS = (
    ModelSpec("t5", {"model_type": "t5", "d_model": 128, "d_ff": 384, "d_kv": 32, "num_heads": 4, "num_layers": 2,
                     "num_decoder_layers": 2, "feed_forward_proj": "gated-gelu", "dropout_rate": 0.1,
                     "tie_word_embeddings": False},
              cpu_recipe("seq2seq"), untied_head=True),
    ModelSpec("llama", {"model_type": "llama", "hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 2,
                        "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 1024,
                        "tie_word_embeddings": False},
              cpu_recipe("causal")),
)

FLAN_T5_BASE = {"model_type": "t5", "vocab_size": 32128, "d_model": 768, "d_ff": 2048, "d_kv": 64, "num_heads": 12,
                "num_layers": 12, "num_decoder_layers": 12, "feed_forward_proj": "gated-gelu",
                "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128, "dropout_rate": 0.1,
                "layer_norm_epsilon": 1e-6, "tie_word_embeddings": False}
FLAN_T5_LARGE = {**FLAN_T5_BASE, "d_model": 1024, "d_ff": 2816, "num_heads": 16, "num_layers": 24,
                 "num_decoder_layers": 24}
LLAMA_2_7B = {"model_type": "llama", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
              "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
              "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
              "tie_word_embeddings": False}
CUDA_MODELS = (
    ModelSpec("flan-t5-base", FLAN_T5_BASE, "flan-t5-base/full.yaml", untied_head=True, parameters=247_577_856),
    ModelSpec("flan-t5-large", FLAN_T5_LARGE, "flan-t5-large/full.yaml", untied_head=True, parameters=783_150_080),
    ModelSpec("llama-2-7b-lora", LLAMA_2_7B, "llama-2-7b/lora.yaml", parameters=6_738_415_616),
    ModelSpec("llama-2-7b-qlora", LLAMA_2_7B, "llama-2-7b/qlora.yaml", parameters=6_738_415_616),
)
MODELS = {"cpu": CPU_MODELS, "cuda": CUDA_MODELS}

# dsum's speed switches, per model family. TOKEN_BUDGET stands for batch size x the mean example
# length: micro-batches then hold about as many real tokens as the other ways' batches, so dsum is
# measured on the same work per step, not on bigger batches.
TOKEN_BUDGET = "batch size x mean example tokens"
# fast_cpu_dropout is dsum's default, named here so that the results say so; it acts on the CPU only
# (dsum/cpu_dropout.py: the same dropout, its masks drawn faster).
DSUM_SPEED: dict[str, dict[str, Any]] = {
    "seq2seq": {"group_by_length": True, "max_tokens_per_batch": TOKEN_BUDGET, "fast_cpu_dropout": True},
    # Not train.packing: without flash attention (not installed with dsum) the packed row's mask spans
    # the whole row, and attention costs as if it were one sequence. On the CPU, a run with packing here
    # was slower than length grouping (BENCHMARKS.md).
    "causal": {"group_by_length": True, "max_tokens_per_batch": TOKEN_BUDGET, "fast_cpu_dropout": True},
}

# What `--dsum KEY=VALUE` may set in dsum's own way, to compare a setting against its default: dsum's
# speed settings alone, none of which the other ways read, so that the three ways still train on the
# same data for the same steps and generate the same tokens.
DSUM_OPTIONS = ("train.group_by_length", "train.max_tokens_per_batch", "train.packing", "train.fast_cpu_dropout",
                "train.compile", "train.pad_to_multiple_of", "eval.batch_size", "eval.encoder_batch_size", "eval.cache",
                "eval.compile")

# What BENCHMARKS.md promises; reported next to the results, never asserted by the tests.
GOALS = {"train_speedup_vs_notebook": 3.0, "train_speedup_vs_no_trainer": 1.8, "eval_speedup_vs_notebook": 30.0,
         "eval_speedup_vs_no_trainer": 4.0, "padding_efficiency": 0.9}


@dataclass(frozen=True)
class BenchOptions:
    device: str = "cpu"
    data: Path | None = None
    json_path: Path | None = None
    models: tuple[str, ...] | None = None  # None: every model of the device
    train_steps: int | None = None  # None: the device's Sizes
    eval_dialogues: int | None = None
    notebook_rows: int | None = None
    workdir: Path | None = None  # None: a temporary directory, removed afterwards
    goals: bool = False  # dsum alone on the workloads with absolute goals (dsum.bench_goals), not the three ways
    dsum: tuple[str, ...] = ()  # KEY=VALUE settings of dsum's own way (DSUM_OPTIONS)
    profile: Path | None = None  # torch.profiler's tables of a few steps of each training run go here
    record: bool = False  # write the JSON under RESULTS, named by date, device, kind and commit

    def sizes(self) -> Sizes:
        sizes = SIZES[self.device]
        given = {"train_steps": self.train_steps, "eval_dialogues": self.eval_dialogues,
                 "notebook_rows": self.notebook_rows}
        for name, value in given.items():
            if value is not None and value < 1:
                raise RecipeError(f"--{name.replace('_', '-')}: must be at least 1, got {value}")
        return replace(sizes, **{k: v for k, v in given.items() if v is not None})

    def dsum_settings(self) -> dict[str, dict[str, Any]]:
        """`--dsum KEY=VALUE` as recipe sections, {"train": {...}, "eval": {...}}, each value read as the
        recipe schema types it (checked in full with the rest of the recipe, by `check_dsum_settings`)."""
        sections: dict[str, dict[str, Any]] = {"train": {}, "eval": {}}
        for item in self.dsum:
            if item.partition("=")[0] not in DSUM_OPTIONS or "=" not in item:
                raise RecipeError(f"--dsum {item}: expected KEY=VALUE, KEY one of {', '.join(DSUM_OPTIONS)} (the "
                                  "settings of dsum's own way that the other ways do not read)")
            apply_override(sections, item)
        return sections

    def command(self) -> str:
        """The command line that reruns this bench."""
        words = ["dsum", "bench", *(["--goals"] if self.goals else []), "--device", self.device]
        for flag, value in (("--data", self.data), ("--json", self.json_path), ("--record", self.record or None),
                            ("--models", ",".join(self.models) if self.models else None),
                            ("--train-steps", self.train_steps), ("--eval-dialogues", self.eval_dialogues),
                            ("--notebook-rows", self.notebook_rows), ("--workdir", self.workdir),
                            ("--profile", self.profile)):
            if value is True:
                words.append(flag)
            elif value is not None:
                words += [flag, str(value)]
        for item in self.dsum:
            words += ["--dsum", item]
        return " ".join(words)

    def check_outputs(self) -> None:
        """What the run will write, refused before anything runs: --profile names a directory (made if
        missing), and --record picks the file that --json would name."""
        if self.profile is not None:
            check_directory("--profile", self.profile, "the profile files")
        if self.record:
            if self.json_path is not None:
                raise RecipeError(f"--record: it names the results file itself, under {RESULTS}/; give --record or "
                                  "--json, not both")
            check_directory("--record", RESULTS, "the recorded results")

    def results_path(self, results: dict[str, Any]) -> Path | None:
        """--json's file; with --record, RESULTS/<UTC date and time>-<device>-<bench|goals>-<commit>.json."""
        if not self.record:
            return self.json_path
        return RESULTS / record_name(results["date"], self.device, "goals" if self.goals else "bench",
                                     results["commit"], results["dirty"])


def record_name(date: str, device: str, kind: str, commit: str | None, dirty: bool | None) -> str:
    """`2026-12-04T140512Z-cuda-bench-2ea07b4.json` for results dated 2026-12-04T14:05:12+00:00 (UTC), at
    commit 2ea07b4; `-dirty` after a commit whose tracked files were changed, `nogit` outside a checkout."""
    moment = datetime.fromisoformat(date).astimezone(timezone.utc).strftime("%Y-%m-%dT%H%M%SZ")
    source = "nogit" if commit is None else commit[:7] + ("-dirty" if dirty else "")
    return f"{moment}-{device}-{kind}-{source}.json"


def check_directory(flag: str, path: Path, what: str) -> None:
    """`path` is a directory, or can be made one: the nearest of it and its parents that exists is one."""
    existing = next((p for p in (path, *path.parents) if p.exists()), Path("."))
    if not existing.is_dir():
        where = "it is a file" if existing == path else f"{existing} is a file"
        raise RecipeError(f"{flag} {path}: {where}; expected a directory for {what} (made if missing)")


# ----------------------------------------------------------------------------------------------
# The bench


def run_bench(options: BenchOptions) -> dict[str, Any]:
    """Bench every chosen model; print one line per phase and the table; write the JSON if asked."""
    started = time.perf_counter()
    options.check_outputs()
    check_device(options.device)
    tell_deepspeed_the_device()  # before a way imports it
    from dsum import cpu_speed

    cpu_speed.start_run(options.device)  # for every way alike, from the start
    sizes = options.sizes()
    specs = select_models(options.device, options.models)
    settings = check_dsum_settings(options.dsum_settings(), specs, sizes)
    data_dir = data_directory(options.data)
    load_before = os.getloadavg()
    if options.device == "cpu" and load_before[0] >= 1.0:
        print(f"bench: warning: the load average is {load_before[0]:.1f} on {os.cpu_count()} cores: other work is "
              "running, and it distorts CPU timings (see cpu share below)", flush=True)
    with workspace(options.workdir) as workdir, collections_skip_what_lives_now():
        with phase("data and tokenizer") as note:
            data = BenchData.load(data_dir, sizes, workdir / "tokenizer")
            note(f"{len(data.train)} training dialogues of {data.train_split_size}, {len(data.test)} test dialogues; "
                 f"mean dialogue {data.mean_dialogue_tokens:.0f} tokens, summary {data.mean_summary_tokens:.0f}")
        models = {}
        for spec in specs:
            models[spec.name] = bench_model(spec, sizes, data, options.device, workdir / spec.name, settings,
                                            options.profile)
            free_memory()  # the model's weights go before the next model's arrive
    results = summarize(models, sizes, data, options, load_before, time.perf_counter() - started)
    report(format_table(results), results, options.results_path(results))
    return results


def report(table: str, results: dict[str, Any], json_path: Path | None) -> None:
    """Print the table, and write the results as JSON where asked."""
    print(table, flush=True)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(results, indent=2) + "\n")
        print(f"results: {json_path}", flush=True)


def check_device(device: str) -> None:
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise RecipeError("--device cuda: torch sees no CUDA GPU on this machine; run it on a GPU machine, "
                          "or use --device cpu")


def select_models(device: str, names: Sequence[str] | None) -> list[ModelSpec]:
    known = {spec.name: spec for spec in MODELS[device]}
    if not names:
        return list(known.values())
    unknown = [name for name in names if name not in known]
    if unknown:
        raise RecipeError(f"--models: {', '.join(unknown)} not benched on {device}; choose from {', '.join(known)}")
    return [known[name] for name in dict.fromkeys(names)]


def data_directory(given: Path | None) -> Path:
    path = given or (Path(os.environ["DSUM_DIALOGSUM_DIR"]) if os.environ.get("DSUM_DIALOGSUM_DIR") else None)
    if path is None:
        raise RecipeError("--data: give the DialogSum directory (train/validation/test .jsonl), "
                          "or set DSUM_DIALOGSUM_DIR")
    if not path.is_dir():
        raise RecipeError(f"--data {path}: no such directory")
    return path.resolve()


@contextmanager
def workspace(given: Path | None) -> Iterator[Path]:
    if given is not None:
        given.mkdir(parents=True, exist_ok=True)
        yield given.resolve()
        return
    with tempfile.TemporaryDirectory(prefix="dsum-bench-") as tmp:
        yield Path(tmp)


@contextmanager
def phase(name: str):
    """One progress line per phase, with its wall time and what it found."""
    started = time.perf_counter()
    found: list[str] = []
    yield found.append
    detail = f": {found[-1]}" if found else ""
    print(f"bench: {name} ({time.perf_counter() - started:.1f}s){detail}", flush=True)


@dataclass
class BenchData:
    """The examples every way uses, and the tokenizer trained on the training split."""

    directory: Path
    train: list  # the first Sizes.train_examples training examples
    test: list  # the first Sizes.eval_dialogues test dialogues, each with its references
    train_split_size: int
    tokenizer_dir: Path
    mean_dialogue_tokens: float
    mean_summary_tokens: float

    @classmethod
    def load(cls, directory: Path, sizes: Sizes, tokenizer_dir: Path) -> BenchData:
        from dsum.data import load_split

        config = DataConfig(source=str(directory))
        train_split = load_split(config, "train")
        test = load_split(config, "test")[: sizes.eval_dialogues]
        if len(test) < sizes.eval_dialogues:
            raise RecipeError(f"--eval-dialogues: the test split has {len(test)} dialogues, fewer than "
                              f"{sizes.eval_dialogues}")
        tokenizer = train_bench_tokenizer(train_split, sizes, directory, tokenizer_dir)
        train = train_split[: sizes.train_examples]
        dialogues = tokenizer([e.dialogue for e in train], add_special_tokens=False)["input_ids"]
        summaries = tokenizer([e.references[0] for e in train], add_special_tokens=False)["input_ids"]
        return cls(directory, train, test, len(train_split), tokenizer_dir,
                   sum(map(len, dialogues)) / len(train), sum(map(len, summaries)) / len(train))


def train_bench_tokenizer(examples: list, sizes: Sizes, directory: Path, out: Path):
    """dsum's offline BPE tokenizer, trained on the whole training split, saved for every way to load."""
    from transformers import AutoTokenizer

    from dsum.modeling import train_tokenizer

    recipe = validate_recipe({"model": {"family": "seq2seq", "architecture": {"model_type": "t5"}},
                              "tokenizer": {"train": True, "vocab_size": sizes.vocab_size},
                              "data": {"source": str(directory)}, "output_dir": str(out.parent)})
    texts = (text for e in examples for text in (e.dialogue, *e.references))
    train_tokenizer(recipe, texts).save_pretrained(out)
    return AutoTokenizer.from_pretrained(out)


# ----------------------------------------------------------------------------------------------
# Recipes and the random-init base


def recipe_settings(spec: ModelSpec) -> dict[str, Any]:
    """The spec's recipe settings as a raw mapping (a recipes/ file as written, so defaults stay defaults)."""
    if isinstance(spec.recipe, dict):
        return copy.deepcopy(spec.recipe)
    path = RECIPES / spec.recipe
    if not path.is_file():
        raise RecipeError(f"{path}: no such recipe; dsum bench takes the {spec.name} settings from the "
                          "repository's recipes/ directory")
    return read_yaml(path, "recipe")


def bench_recipe(spec: ModelSpec, sizes: Sizes, *, model_source: dict[str, Any], tokenizer_dir: Path, data_dir: Path,
                 output_dir: Path, dsum: dict[str, dict[str, Any]] | None = None) -> Recipe:
    """The recipe every way reads its settings from; `dsum` ({"train": {...}, "eval": {...}}) adds the
    settings of dsum's own way, for its own runs.

    What the three ways must share is set here: the data, truncation, AdamW at a constant learning
    rate, the step counts and the generation settings."""
    raw = recipe_settings(spec)
    model = raw.get("model", {})
    raw["model"] = {"family": model["family"], "dtype": model.get("dtype", "float32"), **model_source}
    raw["tokenizer"] = {"name_or_path": str(tokenizer_dir), "max_source_length": sizes.max_source_length,
                        "max_target_length": sizes.max_target_length}
    raw["data"] = {"source": str(data_dir), "max_train_samples": sizes.train_examples}
    raw["train"] = {
        **raw.get("train", {}),
        "optimizer": "adamw", "lr_scheduler": "constant", "warmup_steps": 0, "warmup_ratio": 0.0,
        "max_steps": sizes.warmup_steps + sizes.train_steps,
        # A record at the end of the warm-up and at the end of the timed steps (see read_dsum_window).
        "logging_steps": math.gcd(sizes.warmup_steps, sizes.train_steps),
        "eval_steps": None, "save_steps": None, "eval_max_batches": 1, "trackers": [], "seed": sizes.seed,
        **(dsum or {}).get("train", {}),
    }
    raw["eval"] = {"after_training": False, "max_new_tokens": sizes.max_new_tokens, "num_beams": 1, "do_sample": False,
                   "validation_samples": 0, **dsum_generation_settings(model["family"], sizes),
                   **(dsum or {}).get("eval", {})}
    raw["output_dir"] = str(output_dir)
    return validate_recipe(raw, source=f"dsum bench recipe for {spec.name}")


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


def build_model(spec: ModelSpec, config, *, meta: bool = False, device: str = "cpu", dtype=None):
    """The architecture with random weights; FLAN-T5's separate LM head is given back to it
    (transformers ties a T5 head to the embeddings when it builds one from a config)."""
    import torch

    from dsum.modeling import auto_class

    family = "seq2seq" if config.is_encoder_decoder else "causal"
    with torch.device("meta" if meta else device):
        model = auto_class(family).from_config(config, dtype=dtype)
        if spec.untied_head:
            shared = model.get_input_embeddings().weight
            head = torch.empty_like(shared)
            if not meta:
                head.normal_(mean=0.0, std=config.initializer_factor)  # T5's own init of an untied head
            model.lm_head.weight = torch.nn.Parameter(head)
            model.config.tie_word_embeddings = False
    return model


def architecture_config(spec: ModelSpec, tokenizer, sizes: Sizes, tokenizer_dir: Path, data_dir: Path):
    """The transformers config, with the tokenizer's special ids (dsum's own random-init path)."""
    from dsum.modeling import model_config

    recipe = bench_recipe(spec, sizes, model_source={"architecture": spec.architecture}, tokenizer_dir=tokenizer_dir,
                          data_dir=data_dir, output_dir=tokenizer_dir.parent)
    return model_config(recipe, tokenizer)


def parameter_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def base_name(spec: ModelSpec) -> str:
    """Specs with the same architecture (Llama-2-7B for LoRA and QLoRA) share one saved base."""
    import hashlib

    key = json.dumps([spec.architecture, spec.untied_head, recipe_settings(spec).get("model", {}).get("dtype")],
                     sort_keys=True)
    return f"{spec.architecture['model_type']}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def save_base(spec: ModelSpec, sizes: Sizes, data: BenchData, device: str, out: Path) -> tuple[Path, int]:
    """Random-init weights, seeded, saved once: every way loads the same ones."""
    import torch
    from transformers import AutoTokenizer, set_seed

    count_file = out / "parameters.json"
    if count_file.is_file():  # saved already, for a spec with the same architecture
        return out, json.loads(count_file.read_text())["parameters"]
    tokenizer = AutoTokenizer.from_pretrained(data.tokenizer_dir)
    config = architecture_config(spec, tokenizer, sizes, data.tokenizer_dir, data.directory)
    dtype = getattr(torch, recipe_settings(spec).get("model", {}).get("dtype", "float32"))
    set_seed(sizes.seed)
    model = build_model(spec, config, device=device, dtype=dtype)  # on the GPU when there is one: fast
    count = parameter_count(model)
    model.save_pretrained(out)
    count_file.write_text(json.dumps({"parameters": count}))
    del model
    free_memory()
    return out, count


# ----------------------------------------------------------------------------------------------
# One model: three ways to train, three ways to generate


def bench_model(spec: ModelSpec, sizes: Sizes, data: BenchData, device: str, workdir: Path,
                settings: dict[str, dict[str, Any]], profile_dir: Path | None = None) -> dict[str, Any]:
    """The three ways on one model; `settings` are `--dsum`'s, over dsum's speed settings; with
    `profile_dir`, each way's first training round is profiled (`WayProfilers`)."""
    from transformers import AutoTokenizer

    from dsum.features import Featurizer

    with phase(f"{spec.name}: random-init base") as note:
        base, parameters = save_base(spec, sizes, data, device, workdir.parent / "bases" / base_name(spec))
        note(f"{parameters:,} parameters")
    paths = {"model_source": {"name_or_path": str(base)}, "tokenizer_dir": data.tokenizer_dir,
             "data_dir": data.directory, "output_dir": workdir / "dsum"}
    recipe = bench_recipe(spec, sizes, **paths)
    tokenizer = AutoTokenizer.from_pretrained(data.tokenizer_dir)
    features = Featurizer(recipe, tokenizer).training_features(data.train)
    speed = dsum_speed_settings(recipe.model.family, recipe.train.per_device_batch_size, features)
    dsum = {"train": {**speed, **settings["train"]}, "eval": settings["eval"]}
    dsum_recipe = bench_recipe(spec, sizes, **paths, dsum=dsum)

    parts = train_rounds(sizes)
    profiled = WayProfilers(profile_dir, spec.name, device, parts)
    trainers = {  # each takes its round's sizes: the steps it times and its seed
        "notebook": lambda part: train_notebook(recipe, base, tokenizer, features, part, device, workdir,
                                                profiled("notebook", part)),
        "no_trainer": lambda part: train_no_trainer(recipe, base, tokenizer, features, part, device,
                                                    profiled("no_trainer", part)),
        "dsum": lambda part: train_dsum(bench_recipe(spec, part, **paths, dsum=dsum), part, profiled("dsum", part)),
    }
    trained = in_rounds(f"{spec.name}: train", trainers, parts, [part.seed for part in parts], device,
                        TrainSpeed.combined)
    with phase(f"{spec.name}: model for generation"):
        model = eval_model(recipe, base, sizes, device)
    rounds = eval_rounds(sizes, data.test)
    generators = {  # each takes its round's number
        "notebook": lambda part: eval_notebook(recipe, model, tokenizer, data.test, sizes, device, part, rounds),
        "no_trainer": lambda part: eval_no_trainer(recipe, model, tokenizer, data.test, sizes, device, part, rounds),
        "dsum": lambda part: eval_dsum(dsum_recipe, model, tokenizer, data.test, device),
    }
    evaluated = in_rounds(f"{spec.name}: eval", generators, range(rounds), [sizes.seed] * rounds, device,
                          EvalSpeed.combined)
    return {
        "family": recipe.model.family,
        "parameters": parameters,
        "architecture": spec.architecture,
        "recipe": spec.recipe if isinstance(spec.recipe, str) else "inline (dsum/bench.py cpu_recipe)",
        "adapter": recipe.adapter.method,
        "batch_size": recipe.train.per_device_batch_size,
        "gradient_accumulation_steps": recipe.train.gradient_accumulation_steps,
        "learning_rate": recipe.train.learning_rate,
        "precision": {"weights": recipe.model.dtype, "mixed_precision": recipe.train.mixed_precision,
                      "generation": sizes.eval_dtype},
        "dsum_settings": dsum_own_settings(dsum_recipe, "train"),
        "dsum_eval_settings": dsum_own_settings(dsum_recipe, "eval"),
        "train": {way: result.as_dict() for way, result in trained.items()},
        "eval": {way: result.as_dict() for way, result in evaluated.items()},
        "profile": profiled.briefs() if profile_dir is not None else None,
    }


class WayProfilers:
    """Each way's StepProfiler: its first training round's, over a few of its timed steps (the later
    rounds run unprofiled: a profile of one round says where the time goes, and the others time the
    way without the profiler's cost)."""

    def __init__(self, directory: Path | None, model: str, device: str, parts: Sequence[Sizes]):
        first = parts[0]
        schedule = Schedule.after(first.warmup_steps, first.warmup_steps + first.train_steps)
        self.first = first
        self.by_way = {way: StepProfiler(directory, f"{model}-{way}", device, schedule) for way in WAYS}

    def __call__(self, way: str, part: Sizes) -> StepProfiler:
        return self.by_way[way] if part == self.first else StepProfiler.off()

    def briefs(self) -> dict[str, Any]:
        """What the results JSON keeps of each way's profile (the files hold the rest)."""
        return {way: brief(p.record) if p.record else None for way, p in self.by_way.items()}


def in_rounds(label: str, ways: dict[str, Callable[[Any], Any]], parts: Sequence, seeds: Sequence[int], device: str,
              combine: Callable[[list], Any]) -> dict[str, Any]:
    """Every way once a round, in turn, each round on its part (and from its seed); each way's rounds
    combined into one speed. A slow spell on the machine then falls on every way, not on the one that
    happened to be running."""
    timed = [{way: run_way(f"{label} {way}, round {number} of {len(parts)}", functools.partial(run, part), device, seed)
              for way, run in ways.items()}
             for number, (part, seed) in enumerate(zip(parts, seeds), start=1)]
    combined = {way: combine([speeds[way] for speeds in timed]) for way in ways}
    for way, speed in combined.items():
        print(f"bench: {label} {way}, {len(parts)} rounds: {speed.describe()}", flush=True)
    return combined


def run_way(label: str, run, device: str, seed: int):
    """Run one way from a clean state, with its progress line. On a CPU it also notes the share of the
    cores the process got, and the share of the machine's cores other processes took meanwhile (where
    the system tells it): the second is what says that other work slowed this way down, since the
    first also falls with the way's own single-threaded work (dsum's setup inside its phase)."""
    import torch

    with phase(label) as note:
        fresh_state(seed)
        cpu, wall, machine = time.process_time(), time.perf_counter(), machine_cpu_seconds()
        result = run()
        if device == "cpu":
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            machine = None if machine is None else machine_cpu_seconds() - machine
            result.cpu_share, result.other_cpu_share = cpu_shares(cpu, wall, machine, torch.get_num_threads(),
                                                                  os.cpu_count() or 1)
        note(result.describe())
    free_memory()
    return result


def cpu_shares(own: float, wall: float, machine: float | None, threads: int, cores: int) -> tuple[float, float | None]:
    """(the share of its threads' time the way's process used, the share of the machine's cores that other
    processes took meanwhile), from the CPU seconds of the process (`own`) and of every process (`machine`,
    None where the system does not tell) over `wall` seconds."""
    others = None if machine is None else max(machine - own, 0.0) / (wall * cores)
    return own / (wall * threads), others


def machine_cpu_seconds(stat: Path = Path("/proc/stat")) -> float | None:
    """CPU seconds every process has used since boot, and that the hypervisor has given to other
    machines (steal), from Linux's /proc/stat; None elsewhere."""
    try:
        ticks = [int(t) for t in stat.read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    idle = ticks[3] + ticks[4]  # idle, iowait; the rest: user, nice, system, irq, softirq, steal
    return (sum(ticks) - idle) / os.sysconf("SC_CLK_TCK")


def fresh_state(seed: int) -> None:
    """Each way starts as in its own process: no Accelerate state left by the previous one, same seed."""
    from accelerate.state import AcceleratorState, GradientState, PartialState
    from transformers import set_seed

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    PartialState._reset_state()
    set_seed(seed)


@contextmanager
def collections_skip_what_lives_now() -> Iterator[None]:
    """Python's garbage collector leaves alone the objects alive now (gc.freeze), until the block ends.

    The libraries the ways import leave about half a million objects, and a full collection walks them
    all (about 0.6 s on a 2-core CPU): free_memory collects after every way, and Python collects on its
    own now and then, inside the timed windows too. Only the objects made later are walked; the models
    and optimizers of the ways are all made later, so they are freed as before."""
    import torch  # noqa: F401  (the heavy imports first, so that their objects are frozen too)
    import accelerate  # noqa: F401
    import transformers.trainer  # noqa: F401

    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def synchronize(device: str) -> None:
    """The clock reads after the GPU has finished what was queued."""
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------
# Training


@dataclass
class TrainSpeed:
    steps: int  # optimizer steps timed
    seconds: float
    real_tokens: int  # non-padding tokens in the timed steps
    processed_tokens: int  # token positions computed in them, padding included
    dataset_examples: int  # what the way trained from: the same dialogues in every way
    dataset_real_tokens: int | None = None
    rows: int | None = None  # rows (examples) in the timed steps, where the way shows them
    settings: dict[str, Any] = field(default_factory=dict)
    cpu_share: float | None = None  # see run_way
    other_cpu_share: float | None = None
    rounds: int = 1  # timed parts summed into this (Sizes.train_rounds)

    @classmethod
    def combined(cls, parts: Sequence[TrainSpeed]) -> TrainSpeed:
        """One way's rounds as one: steps, seconds, tokens and rows summed; CPU shares weighted by time."""
        times = [p.seconds for p in parts]
        rows = None if any(p.rows is None for p in parts) else sum(p.rows for p in parts)
        return cls(sum(p.steps for p in parts), sum(times), sum(p.real_tokens for p in parts),
                   sum(p.processed_tokens for p in parts), parts[0].dataset_examples, parts[0].dataset_real_tokens,
                   rows, parts[0].settings, weighted_mean([p.cpu_share for p in parts], times),
                   weighted_mean([p.other_cpu_share for p in parts], times), len(parts))

    @property
    def real_tokens_per_second(self) -> float:
        return self.real_tokens / self.seconds

    @property
    def padding_efficiency(self) -> float:
        return self.real_tokens / self.processed_tokens

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "real_tokens_per_second": self.real_tokens_per_second,
                "padding_efficiency": self.padding_efficiency,
                "real_tokens_per_step": self.real_tokens / self.steps}

    def describe(self) -> str:
        return (f"{self.real_tokens_per_second:,.0f} real tokens/s over {self.steps} steps, padding efficiency "
                f"{self.padding_efficiency:.2f}{busy(self)}")


def token_counts(batch: dict, family: str) -> tuple[int, int]:
    """(real, processed) tokens of a padded training batch of the other ways, counted from its tensors as
    dsum counts its own from their features (`MicroBatch`; the tests hold the two together): real, the
    encoder's unmasked tokens and the decoder's targets, or a causal row's unmasked tokens; processed,
    every position computed, padding included (a seq2seq decoder computes as many as the labels are wide)."""
    from dsum.features import IGNORE_INDEX

    real = int(batch["attention_mask"].sum())
    processed = batch["input_ids"].numel()
    if family == "seq2seq":
        real += int((batch["labels"] != IGNORE_INDEX).sum())
        processed += batch["labels"].numel()
    return real, processed


def feature_real_tokens(features: Sequence, family: str) -> int:
    from dsum.features import IGNORE_INDEX

    return sum(len(f.input_ids) + (sum(t != IGNORE_INDEX for t in f.labels) if family == "seq2seq" else 0)
               for f in features)


def train_rounds(sizes: Sizes) -> list[Sizes]:
    """Each training round's sizes: its share of the timed steps (Sizes.train_rounds rounds, fewer when
    there are fewer timed steps) and its own seed, so that the rounds time different batches."""
    rounds = max(1, min(sizes.train_rounds, sizes.train_steps))
    return [replace(sizes, train_steps=len(range(r, sizes.train_steps, rounds)), seed=sizes.seed + r)
            for r in range(rounds)]


def timed_window(step_ends: list[float], micro_counts: list[tuple[int, int, int]], sizes: Sizes,
                 accumulation: int) -> tuple[float, int, int, int]:
    """Seconds, real and processed tokens and rows of the timed steps: from the end of the warm-up's
    last optimizer step to the end of the last timed one, over the micro-batches in between."""
    first, last = sizes.warmup_steps, sizes.warmup_steps + sizes.train_steps
    if len(step_ends) < last:
        raise RuntimeError(f"the loop ran {len(step_ends)} optimizer steps, fewer than the {last} benched")
    window = micro_counts[first * accumulation : last * accumulation]
    return (step_ends[last - 1] - step_ends[first - 1], sum(c[0] for c in window), sum(c[1] for c in window),
            sum(c[2] for c in window))


class CountingCollator:
    """Wraps a collator and counts every batch it makes, in the order the loop takes them."""

    def __init__(self, collate, family: str):
        self.collate, self.family = collate, family
        self.counts: list[tuple[int, int, int]] = []

    def __call__(self, rows):
        batch = self.collate(rows)
        self.counts.append((*token_counts(batch, self.family), len(batch["input_ids"])))
        return batch


def notebook_widths(family: str, sizes: Sizes) -> tuple[int, int]:
    """(input, label) widths of the notebook's max_length padding. It pads inputs and labels alike to
    the tokenizer's 512; a causal row holds the prompt and the summary, so it is padded to 512 + 128."""
    if family == "seq2seq":
        return sizes.max_source_length, sizes.max_source_length
    width = sizes.max_source_length + sizes.max_target_length
    return width, width


def notebook_dataset(features: Sequence, family: str, pad_id: int, sizes: Sizes) -> list[dict]:
    """The notebook's tokenized dataset: every example padded to max_length, once, before training.
    Padded labels are -100 (the notebook leaves pad ids there, and so also trains on padding; the
    compute is the same, and the loss stays the one the other ways minimise)."""
    import torch

    from dsum.features import IGNORE_INDEX

    width, label_width = notebook_widths(family, sizes)
    rows = []
    for f in features:
        rows.append({
            "input_ids": torch.tensor(f.input_ids + [pad_id] * (width - len(f.input_ids))),
            "attention_mask": torch.tensor([1] * len(f.input_ids) + [0] * (width - len(f.input_ids))),
            "labels": torch.tensor(f.labels + [IGNORE_INDEX] * (label_width - len(f.labels))),
        })
    return rows


def stack(rows: list[dict]) -> dict:
    import torch

    return {key: torch.stack([row[key] for row in rows]) for key in rows[0]}


def train_notebook(recipe: Recipe, base: Path, tokenizer, features: Sequence, sizes: Sizes, device: str,
                   workdir: Path, profile: StepProfiler | None = None) -> TrainSpeed:
    """(a) The course notebook: Trainer, max_length padding, random order."""
    from transformers import Trainer, TrainerCallback, TrainingArguments
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from dsum.modeling import load_model

    family, cfg = recipe.model.family, recipe.train
    dataset = notebook_dataset(features, family, tokenizer.pad_token_id, sizes)
    collator = CountingCollator(stack, family)
    step_ends: list[float] = []
    profile = profile or StepProfiler.off()

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            synchronize(device)
            step_ends.append(time.perf_counter())
            profile.step()

    args = TrainingArguments(
        output_dir=str(workdir / "notebook"), per_device_train_batch_size=cfg.per_device_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps, learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay, lr_scheduler_type="constant", max_grad_norm=cfg.max_grad_norm or 0.0,
        max_steps=sizes.warmup_steps + sizes.train_steps, bf16=cfg.mixed_precision == "bf16",
        use_cpu=device == "cpu", seed=sizes.seed, report_to="none", logging_strategy="no", save_strategy="no",
        eval_strategy="no", disable_tqdm=True, dataloader_num_workers=0, remove_unused_columns=False,
    )
    trainer = Trainer(model=load_model(recipe, base), args=args, train_dataset=dataset, data_collator=collator,
                      callbacks=[StepClock()])
    for quiet in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(quiet)
    with profile:
        trainer.train()
    seconds, real, processed, rows = timed_window(step_ends, collator.counts, sizes, cfg.gradient_accumulation_steps)
    dataset_real = sum(token_counts(row, family)[0] for row in dataset)
    del trainer
    return TrainSpeed(sizes.train_steps, seconds, real, processed, len(dataset), dataset_real, rows,
                      {"padding": "max_length", "input_width": notebook_widths(family, sizes)[0],
                       "label_width": notebook_widths(family, sizes)[1], "order": "random (Trainer's sampler)",
                       "max_grad_norm": cfg.max_grad_norm})


def train_no_trainer(recipe: Recipe, base: Path, tokenizer, features: Sequence, sizes: Sizes,
                     device: str, profile: StepProfiler | None = None) -> TrainSpeed:
    """(b) run_summarization_no_trainer: an Accelerate loop over dynamically padded, shuffled batches,
    AdamW, the model's mean loss, no gradient clipping (the script has none)."""
    import torch
    from accelerate import Accelerator
    from torch.utils.data import DataLoader
    from transformers import DataCollatorForSeq2Seq, get_scheduler

    from dsum.features import IGNORE_INDEX
    from dsum.modeling import load_model

    family, cfg = recipe.model.family, recipe.train
    accelerator = Accelerator(gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                              mixed_precision=cfg.mixed_precision, cpu=device == "cpu")
    # The script pads to a multiple of 8 under mixed precision (tensor cores).
    pad_collator = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX,
                                          pad_to_multiple_of=8 if cfg.mixed_precision != "no" else None)
    collator = CountingCollator(pad_collator, family)
    rows = [{"input_ids": f.input_ids, "labels": f.labels} for f in features]
    loader = DataLoader(rows, batch_size=cfg.per_device_batch_size, shuffle=True, collate_fn=collator,
                        generator=torch.Generator().manual_seed(sizes.seed))
    model = load_model(recipe, base)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
                                   {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                                  lr=cfg.learning_rate)
    total = sizes.warmup_steps + sizes.train_steps
    scheduler = get_scheduler("constant", optimizer, num_warmup_steps=0, num_training_steps=total)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    model.train()
    step_ends: list[float] = []
    with profile or StepProfiler.off() as profile:
        while len(step_ends) < total:
            for batch in loader:
                with accelerator.accumulate(model):
                    loss = model(**batch).loss
                    accelerator.backward(loss)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad()
                if accelerator.sync_gradients:
                    synchronize(device)
                    step_ends.append(time.perf_counter())
                    profile.step()
                    if len(step_ends) == total:
                        break
    seconds, real, processed, n = timed_window(step_ends, collator.counts, sizes, cfg.gradient_accumulation_steps)
    accelerator.free_memory()
    return TrainSpeed(sizes.train_steps, seconds, real, processed, len(rows), feature_real_tokens(features, family), n,
                      {"padding": "longest in batch (DataCollatorForSeq2Seq)", "order": "random (shuffled DataLoader)",
                       "max_grad_norm": None})


def train_dsum(recipe: Recipe, sizes: Sizes, profile: StepProfiler | None = None) -> TrainSpeed:
    """(c) dsum's own loop, through `dsum.train.train`, timed by its own telemetry."""
    from dsum.train import train

    train(recipe, overwrite=True, profile=profile)
    output_dir = Path(recipe.output_dir)
    seconds, real, processed = read_dsum_window(output_dir / "metrics.jsonl", sizes)
    run = json.loads((output_dir / "run.json").read_text())
    return TrainSpeed(sizes.train_steps, seconds, real, processed, run["num_train_examples"],
                      settings=dsum_own_settings(recipe, "train") | {"max_grad_norm": recipe.train.max_grad_norm})


def dsum_own_settings(recipe: Recipe, section: str) -> dict[str, Any]:
    """The recipe's values of DSUM_OPTIONS in one section, as the results report them."""
    values = getattr(recipe, section)
    return {key: getattr(values, key) for key in (option.split(".")[1] for option in DSUM_OPTIONS
                                                   if option.startswith(f"{section}."))}


def read_dsum_window(metrics_file: Path, sizes: Sizes) -> tuple[float, int, int]:
    """Seconds, real and processed tokens of the timed steps, from dsum's metrics.jsonl.

    dsum logs every gcd(warm-up, timed) steps; each record holds the rates since the one before and
    the seconds since the loop began. The timed window runs from the record at the end of the warm-up
    to the last one: the same window the other ways time (warm-up excluded, unlike run.json's
    whole-loop summary)."""
    seconds, totals = window_totals(metrics_file, sizes, ("tokens_per_second", "processed_tokens_per_second"))
    return seconds, round(totals["tokens_per_second"]), round(totals["processed_tokens_per_second"])


def window_totals(metrics_file: Path, sizes: Sizes, rates: Sequence[str]) -> tuple[float, dict[str, float | None]]:
    """Seconds of the timed window (see read_dsum_window) and, for each rate logged per second, its
    amount over the window: the rate times the span of each record. None for a rate a record lacks
    (MFU where the GPU's peak is not known)."""
    records = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    records = [r for r in records if "tokens_per_second" in r]
    start = next(r for r in records if r["step"] == sizes.warmup_steps)
    totals: dict[str, float | None] = dict.fromkeys(rates, 0.0)
    previous = start
    for record in records:
        if record["step"] <= sizes.warmup_steps:
            continue
        span = record["elapsed_seconds"] - previous["elapsed_seconds"]
        for rate in rates:
            value = record.get(rate)
            totals[rate] = None if value is None or totals[rate] is None else totals[rate] + value * span
        previous = record
    if previous["step"] != sizes.warmup_steps + sizes.train_steps:
        raise RuntimeError(f"dsum logged up to step {previous['step']}, not {sizes.warmup_steps + sizes.train_steps}")
    return previous["elapsed_seconds"] - start["elapsed_seconds"], totals


# ----------------------------------------------------------------------------------------------
# Generation


@dataclass
class EvalSpeed:
    dialogues: int  # test dialogues the way produces predictions for
    rows: int  # generations that takes: one per flattened row, or one per dialogue (dsum)
    rows_timed: int  # rows actually generated and timed (fewer when extrapolated)
    batch_size: int
    seconds_timed: float
    mean_new_tokens: float  # tokens generated a row: equal across ways, or the comparison is unfair
    cpu_share: float | None = None  # see run_way
    other_cpu_share: float | None = None
    rounds: int = 1  # timed parts summed into this (Sizes.eval_rounds)

    @classmethod
    def combined(cls, parts: Sequence[EvalSpeed]) -> EvalSpeed:
        """One way's rounds as one: rows and seconds summed; per-row and per-second figures weighted."""
        times = [p.seconds_timed for p in parts]
        return cls(parts[0].dialogues, parts[0].rows, sum(p.rows_timed for p in parts), parts[0].batch_size, sum(times),
                   weighted_mean([p.mean_new_tokens for p in parts], [p.rows_timed for p in parts]),
                   weighted_mean([p.cpu_share for p in parts], times),
                   weighted_mean([p.other_cpu_share for p in parts], times), len(parts))

    @property
    def extrapolated(self) -> bool:
        return self.rows_timed < self.rows

    @property
    def seconds(self) -> float:
        """Seconds for all the rows: the timed ones scaled up when only some were timed."""
        return self.seconds_timed * self.rows / self.rows_timed

    @property
    def dialogues_per_second(self) -> float:
        return self.dialogues / self.seconds

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "extrapolated": self.extrapolated, "seconds": self.seconds,
                "dialogues_per_second": self.dialogues_per_second}

    def describe(self) -> str:
        timed = (f", timed on {self.rows_timed} of {self.rows} rows and extrapolated" if self.extrapolated else "")
        return (f"{self.dialogues_per_second:.2f} dialogues/s ({self.rows} generations of {self.mean_new_tokens:.1f} "
                f"tokens, batch {self.batch_size}{timed}){busy(self)}")


def weighted_mean(values: Sequence[float | None], weights: Sequence[float]) -> float | None:
    """None where a part has no figure (a share the system does not report)."""
    if any(v is None for v in values):
        return None
    return sum(v * w for v, w in zip(values, weights)) / sum(weights)


BUSY = 0.8  # a CPU share below this: other work on the machine may have slowed the way down
OTHERS_BUSY = 0.1  # other processes' share of the cores above this: it did


def busy(speed: TrainSpeed | EvalSpeed) -> str:
    if speed.cpu_share is None:
        return ""
    if speed.other_cpu_share is None:  # no system-wide figure: the process's own share has to tell
        return f"; cpu share {speed.cpu_share:.2f}" + (" (the machine was busy)" if speed.cpu_share < BUSY else "")
    return (f"; cpu share {speed.cpu_share:.2f}, other processes {speed.other_cpu_share:.2f}"
            + (" (the machine was busy)" if speed.other_cpu_share > OTHERS_BUSY else ""))


def eval_model(recipe: Recipe, base: Path, sizes: Sizes, device: str):
    """The model all three ways generate with: the random-init base (with a fresh LoRA adapter for
    LoRA/QLoRA recipes, which leaves its outputs unchanged), in Sizes.eval_dtype. The trained copies
    are not used: a few steps may teach one of them to stop early, and then it would generate less."""
    from dsum.modeling import add_lora, load_model

    recipe = recipe.model_copy(update={"model": recipe.model.model_copy(update={"dtype": sizes.eval_dtype})})
    model = load_model(recipe, base, for_training=False)
    if not getattr(model, "is_quantized", False):  # a 4-bit base is placed on the GPU as it loads
        model = model.to(device)
    if recipe.adapter.method != "none":
        model = add_lora(recipe, model)
    return model.eval()


def flattened_rows(examples: Sequence) -> list[tuple[int, str]]:
    """The Hub's flattened test split: (dialogue index, reference), one row per reference, in order."""
    return [(i, reference) for i, example in enumerate(examples) for reference in example.references]


def new_tokens(output, prompt_width: int, family: str, tokenizer) -> list[list[int]]:
    """Generated tokens per row, counted as dsum counts them (up to the first EOS, no padding)."""
    from dsum.generate import strip_padding

    if family == "causal":
        output = output[:, prompt_width:]
    return [strip_padding(row, tokenizer) for row in output.tolist()]


def generate(model, tokenizer, recipe: Recipe, prompts: list[list[int]], device: str, left: bool):
    """One `generate` call on these prompts with dsum's generation settings (every way uses the same)."""
    from dsum.generate import generation_kwargs

    batch = tokenizer.pad({"input_ids": prompts}, padding_side="left" if left else "right", return_tensors="pt")
    return model.generate(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                          **generation_kwargs(recipe, tokenizer)), batch["input_ids"].shape[1]


def eval_rounds(sizes: Sizes, examples: Sequence) -> int:
    """Sizes.eval_rounds, or fewer where the notebook's timed rows or no_trainer's batches are fewer."""
    rows = len(flattened_rows(examples))
    return max(1, min(sizes.eval_rounds, sizes.notebook_rows, rows, math.ceil(rows / sizes.no_trainer_eval_batch)))


def eval_notebook(recipe: Recipe, model, tokenizer, examples: Sequence, sizes: Sizes, device: str, part: int,
                  parts: int) -> EvalSpeed:
    """(a) One row at a time over the flattened split: a fixed random sample of rows is timed (every
    parts-th of it, from `part`, in this round), and the time is scaled to all the rows."""
    import torch

    from dsum.features import Featurizer

    rows = flattened_rows(examples)
    sample = sorted(random.Random(sizes.seed).sample(range(len(rows)), min(sizes.notebook_rows, len(rows))))
    timed = sample[part::parts]
    featurizer = Featurizer(recipe, tokenizer)
    family = recipe.model.family
    generated = []
    with torch.no_grad():
        generate(model, tokenizer, recipe, [featurizer.prompt_ids(examples[0].dialogue)], device, left=False)  # warm-up
        synchronize(device)
        started = time.perf_counter()
        for index in timed:
            prompt = featurizer.prompt_ids(examples[rows[index][0]].dialogue)
            output, width = generate(model, tokenizer, recipe, [prompt], device, left=False)
            tokens = new_tokens(output, width, family, tokenizer)
            tokenizer.decode(tokens[0], skip_special_tokens=True)
            generated += tokens
        synchronize(device)
        seconds = time.perf_counter() - started
    return EvalSpeed(len(examples), len(rows), len(timed), 1, seconds, mean_length(generated))


def eval_no_trainer(recipe: Recipe, model, tokenizer, examples: Sequence, sizes: Sizes, device: str, part: int,
                    parts: int) -> EvalSpeed:
    """(b) Batches of the script's eval batch size over the flattened rows, in dataset order (every
    parts-th batch, from `part`, in this round)."""
    import torch

    from dsum.features import Featurizer

    rows = flattened_rows(examples)
    featurizer = Featurizer(recipe, tokenizer)
    family, size = recipe.model.family, sizes.no_trainer_eval_batch
    left = family == "causal"  # a decoder-only model continues from the right edge
    generated = []
    with torch.no_grad():
        generate(model, tokenizer, recipe, [featurizer.prompt_ids(examples[0].dialogue)], device, left)  # warm-up
        synchronize(device)
        started = time.perf_counter()
        for start in range(0, len(rows), size)[part::parts]:
            prompts = featurizer.prompts_ids([examples[i].dialogue for i, _ in rows[start : start + size]])
            output, width = generate(model, tokenizer, recipe, prompts, device, left)
            tokens = new_tokens(output, width, family, tokenizer)
            tokenizer.batch_decode(tokens, skip_special_tokens=True)
            generated += tokens
        synchronize(device)
        seconds = time.perf_counter() - started
    return EvalSpeed(len(examples), len(rows), len(generated), size, seconds, mean_length(generated))


def eval_dsum(recipe: Recipe, model, tokenizer, examples: Sequence, device: str) -> EvalSpeed:
    """(c) dsum's generator over the unique dialogues, longest first, eval.batch_size at a time: the whole
    pass in every round (a part of it would change how the dialogues fall into batches)."""
    from dsum.generate import generate_predictions

    generate_predictions(recipe, model, tokenizer, examples[:1], device)  # warm-up
    synchronize(device)
    started = time.perf_counter()
    predictions = generate_predictions(recipe, model, tokenizer, examples, device)
    synchronize(device)
    seconds = time.perf_counter() - started
    return EvalSpeed(len(examples), len(examples), len(examples), recipe.eval.batch_size, seconds,
                     sum(p.generated_tokens for p in predictions) / len(predictions))


def mean_length(rows: list[list[int]]) -> float:
    return sum(map(len, rows)) / len(rows)


# ----------------------------------------------------------------------------------------------
# Results


def model_ratios(model: dict[str, Any]) -> dict[str, float]:
    train, evaluation = model["train"], model["eval"]
    rate = {way: train[way]["real_tokens_per_second"] for way in WAYS}
    speed = {way: evaluation[way]["dialogues_per_second"] for way in WAYS}
    return {
        "train_speedup_vs_notebook": rate["dsum"] / rate["notebook"],
        "train_speedup_vs_no_trainer": rate["dsum"] / rate["no_trainer"],
        "eval_speedup_vs_notebook": speed["dsum"] / speed["notebook"],
        "eval_speedup_vs_no_trainer": speed["dsum"] / speed["no_trainer"],
        "padding_efficiency": train["dsum"]["padding_efficiency"],
    }


def summarize(models: dict[str, dict], sizes: Sizes, data: BenchData, options: BenchOptions,
              load_before: tuple[float, float, float], wall_seconds: float) -> dict[str, Any]:
    """The top-level figures are the minimum over the models (the claim every model supports)."""
    for model in models.values():
        model["ratios"] = model_ratios(model)
    top = {key: min(m["ratios"][key] for m in models.values()) for key in GOALS}
    return {
        **top,
        "combined_over_models": "minimum",
        "goals": GOALS,
        "models": models,
        "data": {"directory": str(data.directory), "train_dialogues": len(data.train),
                 "train_split_dialogues": data.train_split_size, "test_dialogues": len(data.test),
                 "test_rows_flattened": len(flattened_rows(data.test)), "tokenizer_vocab": sizes.vocab_size,
                 "mean_dialogue_tokens": data.mean_dialogue_tokens, "mean_summary_tokens": data.mean_summary_tokens},
        "sizes": asdict(sizes),
        "dsum_options": list(options.dsum),  # `--dsum`: dsum's way ran with these instead of its defaults
        "machine": machine(options.device, load_before),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": options.command(),
        **source_checkout(),  # commit, dirty
        "profile_dir": profile_directory(options),
        "wall_seconds": wall_seconds,
    }


def profile_directory(options: BenchOptions) -> str | None:
    return None if options.profile is None else str(options.profile.resolve())


def machine(device: str, load_before: tuple[float, float, float]) -> dict[str, Any]:
    import accelerate
    import peft
    import torch
    import transformers

    info = {
        "device": device, "cpu": cpu_model(), "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "accelerate": accelerate.__version__, "peft": peft.__version__, "platform": platform.platform(),
        # Other work on the machine slows every way; the load says how quiet it was.
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
    }
    if device == "cuda":
        info.update(gpu=torch.cuda.get_device_name(0), cuda=torch.version.cuda)
    return info


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def format_table(results: dict[str, Any]) -> str:
    lines = []
    header = f"{'':28}{'notebook':>12}{'no_trainer':>12}{'dsum':>12}{'dsum/notebook':>15}{'dsum/no_trainer':>17}"
    for name, model in results["models"].items():
        train, evaluation, ratios = model["train"], model["eval"], model["ratios"]
        lines += ["", f"{name} ({model['family']}, {model['parameters']:,} parameters, {model['adapter']} adapter)",
                  header]
        lines.append(row("train real tokens/s", [train[w]["real_tokens_per_second"] for w in WAYS], "{:,.0f}",
                         [ratios["train_speedup_vs_notebook"], ratios["train_speedup_vs_no_trainer"]]))
        lines.append(row("train padding efficiency", [train[w]["padding_efficiency"] for w in WAYS], "{:.2f}"))
        lines.append(row("eval dialogues/s", [evaluation[w]["dialogues_per_second"] for w in WAYS], "{:,.2f}",
                         [ratios["eval_speedup_vs_notebook"], ratios["eval_speedup_vs_no_trainer"]]))
        lines.append(row("eval new tokens a row", [evaluation[w]["mean_new_tokens"] for w in WAYS], "{:.1f}"))
        notebook = evaluation["notebook"]
        if notebook["extrapolated"]:
            lines.append(f"  notebook eval: {notebook['rows_timed']} of {notebook['rows']} flattened rows generated "
                         f"one at a time and timed; the time is extrapolated to all {notebook['rows']}")
    data = results["data"]
    lines += ["", f"data: {data['train_dialogues']} training dialogues, {data['test_dialogues']} test dialogues "
                  f"({data['test_rows_flattened']} flattened rows); mean dialogue {data['mean_dialogue_tokens']:.0f} "
                  f"tokens ({data['tokenizer_vocab']:,}-token BPE trained on the training split)"]
    if results["dsum_options"]:
        lines.append(f"dsum's way ran with {' '.join(results['dsum_options'])} (--dsum), not its defaults")
    lines.append("overall (minimum over models; goal in brackets):")
    for key, goal in results["goals"].items():
        lines.append(f"  {key:30} {results[key]:8.2f}  [>= {goal:g}]")
    lines.append(f"machine: {results['machine']['cpu']}, {results['machine']['cpu_cores']} cores, torch "
                 f"{results['machine']['torch']}{', ' + results['machine']['gpu'] if 'gpu' in results['machine'] else ''}"
                 f"; load average before {results['machine']['load_average_before'][0]:.2f}")
    speeds = [m[part][way] for m in results["models"].values() for part in ("train", "eval") for way in WAYS]
    others = [s["other_cpu_share"] for s in speeds if s["other_cpu_share"] is not None]
    shares = [s["cpu_share"] for s in speeds if s["cpu_share"] is not None]
    if others and max(others) > OTHERS_BUSY:
        lines.append(f"warning: other processes took up to {max(others):.2f} of the machine's cores during a phase: "
                     "they slowed some ways more than others, so the ratios are not reliable; rerun on a quiet machine "
                     "(on a shared one, OMP_NUM_THREADS=1 is steadier)")
    elif not others and shares and min(shares) < BUSY:
        lines.append(f"warning: this process got as little as {min(shares):.2f} of its {results['machine']['torch_threads']} "
                     "threads' time: other work on the machine slowed some ways more than others, so the ratios are "
                     "not reliable; rerun on a quiet machine (on a shared one, OMP_NUM_THREADS=1 is steadier)")
    lines += provenance(results)
    lines.append(f"total wall time: {results['wall_seconds']:.0f}s")
    return "\n".join(lines)


def provenance(results: dict[str, Any]) -> list[str]:
    """The lines that say which code ran and where its profiles went."""
    commit = results.get("commit")
    lines = [f"dsum commit: {commit[:12] if commit else 'unknown (not a git checkout)'}"
             f"{' with changes to tracked files' if results.get('dirty') else ''}"]
    if results.get("profile_dir"):
        lines.append(f"profiles: {results['profile_dir']} (summary.json holds every run)")
    return lines


def row(label: str, values: list[float], form: str, ratios: list[float] | None = None) -> str:
    cells = "".join(f"{form.format(v):>12}" for v in values)
    if ratios:
        cells += f"{ratios[0]:>14.2f}x{ratios[1]:>16.2f}x"
    return f"  {label:26}{cells}"
