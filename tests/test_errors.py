"""The catalogue of bad input: each case exits with status 2, prints one line on stderr that names the
field, file or value and what was expected, shows no traceback, and writes or changes no file."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import ROOT
from dsum.cli import main

TINY = (ROOT / "recipes" / "tiny" / "t5-lora.yaml").read_text()
SMALL = ["data.synthetic.train_size=16", "data.synthetic.validation_size=4", "data.synthetic.test_size=4",
         "tokenizer.vocab_size=300", "train.max_steps=1"]


def row(i, dialogue="#Person1#: Hi.\n#Person2#: Hello.", summary="They greet."):
    return json.dumps({"id": str(i), "dialogue": dialogue, "summary": summary}) + "\n"


def good_split(n: int = 6) -> str:
    return "".join(row(i, f"#Person1#: Hello {i}.\n#Person2#: Hi {i}.", f"Greeting {i}.") for i in range(n))


def data_dir(ws: Path, files: dict[str, str | bytes]) -> str:
    """A directory of split files; the train, validation and test splits are good unless `files` says otherwise."""
    d = ws / "data"
    d.mkdir(exist_ok=True)
    for name, content in {"train.jsonl": good_split(), "validation.jsonl": good_split(3),
                          "test.jsonl": good_split(3), **files}.items():
        if content is None:
            continue
        (d / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    return f"data.source={d}"


def accelerate_file(ws: Path, name: str, old: str, new: str) -> str:
    """accelerate_configs/NAME.yaml with one setting changed, written into the workspace."""
    path = ws / f"{name}.yaml"
    path.write_text((ROOT / "accelerate_configs" / f"{name}.yaml").read_text().replace(old, new))
    return str(path)


def finished_run(ws: Path) -> str:
    run = ws / "finished"
    (run / "final").mkdir(parents=True)
    (run / "final" / "adapter_model.safetensors").write_bytes(b"weights")
    (run / "run.json").write_text(json.dumps({"status": "finished"}))
    return str(run)


def crashed_run(ws: Path) -> str:
    run = ws / "crashed"
    (run / "tokenizer").mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"status": "running", "first_step_at": "2026-01-01T00:00:00+0000"}))
    return str(run)


def stopped_run_with(ws: Path, checkpoint_files: dict[str, str | bytes]) -> str:
    run = ws / "stopped"
    step = run / "checkpoints" / "step-00000004"
    step.mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"status": "stopped"}))
    for name, content in checkpoint_files.items():
        (step / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(run)


def checkpoint(ws: Path, name: str, content: dict) -> str:
    path = ws / "checkpoint"
    path.mkdir()
    (path / name).write_text(json.dumps(content))
    return str(path)


def predictions(ws: Path, rows: list[dict], name: str = "predictions.jsonl") -> str:
    path = ws / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def evaluated_run(ws: Path, name: str = "evaluated", lines: list[str] | None = None) -> str:
    """A finished run with eval/: `lines` of predictions.jsonl (by default one good row)."""
    run = Path(finished_run(ws)).rename(ws / name)
    (run / "eval").mkdir()
    good = json.dumps({"id": "d0", "prediction": "They greet.", "references": ["They greet."]})
    (run / "eval" / "predictions.jsonl").write_text("".join(line + "\n" for line in lines or [good]))
    (run / "eval" / "metrics.json").write_text(json.dumps({"n": 1, "split": "test"}))
    return str(run)


def fake_final(ws: Path, name: str = "final") -> Path:
    """A full T5's final/ as far as its small files go: what an export or evaluation reads before the weights."""
    path = ws / name
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "t5", "is_encoder_decoder": True}))
    (path / "tokenizer_config.json").write_text("{}")
    return path


def fake_adapter(ws: Path) -> Path:
    """A LoRA adapter's final/ (its small files) that names its base."""
    base = fake_final(ws, "base")
    path = ws / "adapter"
    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps({"task_type": "SEQ_2_SEQ_LM",
                                                          "base_model_name_or_path": str(base)}))
    (path / "tokenizer_config.json").write_text("{}")
    return path


def fake_run(ws: Path, recipe: str, *, base: bool = True, tokenizer: bool = True) -> Path:
    """A run of a tiny recipe with final/ (an adapter) and checkpoints/step-00000004, as far as the small files go."""
    from dsum.config import load_recipe, recipe_to_dict

    run = ws / f"run-of-{recipe}"
    saved = recipe_to_dict(load_recipe(ROOT / "recipes" / "tiny" / f"{recipe}.yaml", [f"output_dir={run}"]))
    step = run / "checkpoints" / "step-00000004"
    for directory in (run / "final", step, *([run / "base"] if base else []), *([run / "tokenizer"] if tokenizer else [])):
        directory.mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"status": "finished", "recipe": saved}))
    (run / "final" / "adapter_config.json").write_text(json.dumps({"task_type": "SEQ_2_SEQ_LM"}))
    (step / "trainer_state.json").write_text(json.dumps({"global_step": 4, "recipe": saved}))
    (step / "COMPLETE").write_text("")
    (step / "model.safetensors").write_bytes(b"weights")
    if base:
        (run / "base" / "config.json").write_text(json.dumps({"model_type": "t5", "is_encoder_decoder": True}))
    if tokenizer:
        (run / "tokenizer" / "tokenizer.json").write_text("{}")
    return run


def with_tokenizer(run: Path) -> Path:
    """The run's trained tokenizer, a real one of three tokens in place of the fake."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({"<unk>": 0, "</s>": 1, "<pad>": 2}, unk_token="<unk>"))
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<unk>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(run / "tokenizer")
    return run


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def recipe_file(ws: Path, text: str) -> str:
    path = ws / "recipe.yaml"
    path.write_text(text)
    return str(path)


# Each case: (id, function of the workspace giving the arguments, what the one line must say).
CASES = [
    # The recipe file itself.
    ("malformed-yaml", lambda ws: ["validate", recipe_file(ws, "model: [unclosed\n")], "malformed YAML at line"),
    ("empty-recipe", lambda ws: ["validate", recipe_file(ws, "")], "the file is empty; expected a mapping"),
    # A key given twice would silently take the second; nested aliases can expand to gigabytes.
    ("a-section-given-twice", lambda ws: ["validate", recipe_file(ws, TINY + "train:\n  seed: 3\n")],
     "'train' is given twice in one mapping"),
    ("a-key-given-twice", lambda ws: ["validate", recipe_file(ws, TINY.replace("model:\n", "model:\n  family: causal\n", 1))],
     "'family' is given twice in one mapping"),
    ("an-alias-bomb", lambda ws: ["validate", recipe_file(ws, "".join(
        f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9) if i else 'x'}]\n" for i in range(6)) + TINY)],
     "more than 32 aliases (*name), which can expand without bound"),
    ("recipe-is-a-list", lambda ws: ["validate", recipe_file(ws, "- model\n- train\n")],
     "expected a mapping of sections (model, train, ...), found a list"),
    ("unknown-key", lambda ws: ["validate", recipe_file(ws, TINY + "trainer:\n  seed: 1\n")],
     "unknown key 'trainer' (did you mean train?)"),
    ("wrong-type", lambda ws: ["validate", recipe_file(ws, TINY.replace("learning_rate: ", "learning_rate: fast #"))],
     "train.learning_rate: got 'fast'"),
    ("missing-recipe", lambda ws: ["train", str(ws / "nope.yaml")], "nope.yaml: no such file"),
    # Overrides.
    ("unknown-override", lambda ws: ["validate", recipe_file(ws, TINY), "train.lerning_rate=1"],
     "unknown key 'lerning_rate' (did you mean train.learning_rate?)"),
    ("override-does-not-parse", lambda ws: ["validate", recipe_file(ws, TINY), "train.max_steps=[1"],
     "override 'train.max_steps': cannot parse value '[1'"),
    ("attention-not-known", lambda ws: ["train", recipe_file(ws, TINY), "model.attn_implementation=flash"],
     "model.attn_implementation: got 'flash'; expected one of eager, "),
    ("validate-for-no-processes", lambda ws: ["validate", recipe_file(ws, TINY), "--num-processes", "-3"],
     "--num-processes: must be at least 1, got -3"),
    ("compare-negative-samples", lambda ws: ["compare", finished_run(ws), "--samples", "-1"],
     "--samples: must be at least 0, got -1"),
    ("compare-a-missing-run", lambda ws: ["compare", str(ws / "nope")],
     "nope: no such directory; expected a run directory (with eval/) or an evaluation directory"),
    ("compare-a-directory-of-no-run", lambda ws: ["compare", str(ws)],
     "holds neither eval/metrics.json nor metrics.json; expected a run directory"),
    ("compare-a-run-not-evaluated", lambda ws: ["compare", finished_run(ws)],
     "finished: a run without a finished evaluation (no eval/metrics.json); evaluate it with dsum eval"),
    ("compare-a-run-twice", lambda ws: ["compare", evaluated_run(ws), str(ws / "evaluated" / "eval")],
     "evaluated/eval: the same evaluation as"),
    ("compare-into-a-file", lambda ws: ["compare", evaluated_run(ws), "--out", str(write(ws / "out.md", "mine"))],
     "out.md: it is a file; expected a directory for the report (made if missing)"),
    ("compare-predictions-cut-short", lambda ws: ["compare", evaluated_run(ws, lines=['{"id": "d0", "predic'])],
     "predictions.jsonl line 1: not JSON"),
    ("compare-predictions-with-an-id-twice", lambda ws: ["compare", evaluated_run(
        ws, lines=[json.dumps({"id": "d0", "prediction": "Hi.", "references": ["Hi."]})] * 2)],
     "predictions.jsonl line 2: id 'd0' appears twice; expected one row per dialogue"),
    ("compare-predictions-without-references", lambda ws: ["compare", evaluated_run(
        ws, lines=[json.dumps({"id": "d0", "prediction": "Hi.", "references": []})])],
     "predictions.jsonl line 1: references: expected a non-empty list of strings; expected a row of dsum eval's"),
    ("override-without-value", lambda ws: ["validate", recipe_file(ws, TINY), "train.per_device_batch_size="],
     "train.per_device_batch_size: got None"),
    # Values out of range.
    ("learning-rate-zero", lambda ws: ["validate", recipe_file(ws, TINY), "train.learning_rate=0"],
     "train.learning_rate: got 0; input should be greater than 0"),
    ("lora-r-zero", lambda ws: ["validate", recipe_file(ws, TINY), "adapter.r=0"], "adapter.r: got 0"),
    ("batch-size-zero", lambda ws: ["validate", recipe_file(ws, TINY), "train.per_device_batch_size=0"],
     "train.per_device_batch_size: got 0"),
    ("dropout-one", lambda ws: ["validate", recipe_file(ws, TINY), "adapter.dropout=1.0"], "adapter.dropout: got 1.0"),
    ("max-new-tokens-zero", lambda ws: ["validate", recipe_file(ws, TINY), "eval.max_new_tokens=0"],
     "eval.max_new_tokens: got 0"),
    ("negative-warmup", lambda ws: ["validate", recipe_file(ws, TINY), "train.warmup_steps=-5"],
     "train.warmup_steps: got -5"),
    ("top-p-above-one", lambda ws: ["validate", recipe_file(ws, TINY), "eval.top_p=1.5"], "eval.top_p: got 1.5"),
    # Settings that do not go together.
    ("a-tokenizer-trained-and-named", lambda ws: ["validate", recipe_file(ws, TINY), "tokenizer.name_or_path=/no/such"],
     "tokenizer.train: true trains a new tokenizer, so tokenizer.name_or_path would go unused; set one of the two"),
    ("quantized-full-fine-tuning", lambda ws: ["validate", recipe_file(ws, TINY), "adapter.method=none",
                                               "quantization.quant_type=nf4"],
     "quantization is set but adapter.method is 'none'"),
    ("merge-a-4-bit-adapter", lambda ws: ["validate", str(ROOT / "recipes" / "tiny" / "t5-qlora.yaml"),
                                          "eval.merge_adapter=true"],
     "eval.merge_adapter cannot fold an adapter into a 4-bit base"),
    ("packing-for-a-seq2seq-model", lambda ws: ["validate", recipe_file(ws, TINY), "train.packing=true"],
     "train.packing puts examples end to end in one decoder row, which only causal models have"),
    ("encoder-parts-for-a-causal-model", lambda ws: ["validate", str(ROOT / "recipes" / "tiny" / "llama-full.yaml"),
                                                     "eval.encoder_batch_size=8"],
     "eval.encoder_batch_size sets how many prompts the encoder takes at a time, and only seq2seq models have an "
     "encoder; remove it for a causal model"),
    ("compile-with-a-dynamic-cache", lambda ws: ["validate", recipe_file(ws, TINY), "eval.compile=true"],
     "eval.compile needs eval.cache: static"),
    ("token-budget-zero", lambda ws: ["validate", recipe_file(ws, TINY), "train.max_tokens_per_batch=0"],
     "train.max_tokens_per_batch: got 0"),
    ("fp16-with-t5", lambda ws: ["validate", recipe_file(ws, TINY), "train.mixed_precision=fp16"],
     "fp16 overflows in T5"),
    ("template-of-the-other-family", lambda ws: ["validate", recipe_file(ws, TINY), "prompt.template=llama2"],
     "prompt.template 'llama2' is for causal models, but model.family is 'seq2seq'"),
    ("zero3-qlora-storage", lambda ws: ["submit", str(ROOT / "recipes" / "tiny" / "t5-qlora.yaml"), "--nodes", "1",
                                        "--gpus-per-node", "8", "--accelerate", "zero3", "--dry-run"],
     "quantization.storage_dtype is uint8 but ZeRO-3 needs it to equal model.dtype (float32)"),
    ("fsdp-qlora-storage", lambda ws: ["submit", str(ROOT / "recipes" / "tiny" / "t5-qlora.yaml"), "--nodes", "1",
                                       "--gpus-per-node", "8", "--accelerate", "fsdp", "--dry-run"],
     "quantization.storage_dtype is uint8 but FSDP needs it to equal model.dtype (float32)"),
    ("fsdp-token-budget-auto", lambda ws: ["submit", recipe_file(ws, TINY), "--nodes", "1", "--gpus-per-node", "8",
                                           "--accelerate", "fsdp", "--dry-run", "train.max_tokens_per_batch=auto"],
     "train.max_tokens_per_batch: auto tries batches on the device before FSDP shards the model"),
    ("fsdp-version-1", lambda ws: ["submit", recipe_file(ws, TINY), "--nodes", "1", "--gpus-per-node", "8",
                                   "--accelerate", accelerate_file(ws, "fsdp", "fsdp_version: 2", "fsdp_version: 1"),
                                   "--dry-run"],
     "fsdp_config.fsdp_version is 1 in the Accelerate config; dsum trains with FSDP2: set fsdp_version: 2"),
    ("arbitrary-python-as-architecture", lambda ws: ["validate", recipe_file(ws, TINY), "model.architecture={model_type: os.system}"],
     "model.architecture: unknown model_type 'os.system'"),
    # Data.
    ("missing-data-directory", lambda ws: ["validate", recipe_file(ws, TINY), f"data.source={ws / 'nowhere'}"],
     "no such directory"),
    ("missing-split", lambda ws: ["train", recipe_file(ws, TINY), data_dir(ws, {"validation.jsonl": None})],
     "split 'validation' in"),
    ("missing-field", lambda ws: ["validate", recipe_file(ws, TINY), data_dir(ws, {}), "data.summary_fields=[abstract]"],
     "no column 'abstract' (data.summary_fields)"),
    ("empty-file", lambda ws: ["validate", recipe_file(ws, TINY), data_dir(ws, {"train.jsonl": ""})],
     "the split is empty"),
    ("only-empty-dialogues", lambda ws: ["validate", recipe_file(ws, TINY),
                                         data_dir(ws, {"train.jsonl": row(1, dialogue="") + row(2, dialogue=" ")})],
     "no usable rows (2 row(s), 2 with an empty"),
    ("not-utf8", lambda ws: ["validate", recipe_file(ws, TINY), data_dir(ws, {"train.jsonl": b"\xff\xfe{}\n"})],
     "not UTF-8"),
    ("ragged-csv", lambda ws: ["validate", recipe_file(ws, TINY),
                               data_dir(ws, {"train.jsonl": None,
                                             "train.csv": "id,dialogue,summary\n1,a,b\n2,c,d,e\n"})],
     "line 3: 4 fields but the header has 3"),
    ("invalid-json-line", lambda ws: ["validate", recipe_file(ws, TINY),
                                      data_dir(ws, {"train.jsonl": good_split(2) + "{not json\n"})],
     "line 3: not valid JSON"),
    ("duplicate-ids", lambda ws: ["validate", recipe_file(ws, TINY),
                                  data_dir(ws, {"train.jsonl": row("x", "#Person1#: A.") + row("x", "#Person1#: B.")})],
     "id 'x' is used by two different dialogues"),
    # dsum score.
    ("score-of-a-tsv-file", lambda ws: ["score", "--predictions", predictions(ws, [], "predictions.tsv")],
     "predictions.tsv: expected a .jsonl, .csv, .parquet or .txt file"),
    ("score-fewer-predictions", lambda ws: ["score", "--predictions", predictions(ws, [{"prediction": "a"}]),
                                            "--references", predictions(ws, [{"summary": "a"}, {"summary": "b"}],
                                                                        "references.jsonl")],
     "1 predictions for 2 references"),
    ("score-missing-column", lambda ws: ["score", "--predictions", predictions(ws, [{"text": "a", "summary": "a"}])],
     "no column 'prediction' (--prediction-field)"),
    ("score-a-repeated-id", lambda ws: ["score", "--predictions", predictions(
        ws, [{"id": "d1", "prediction": "a", "summary": "a"}, {"id": "d1", "prediction": "a", "summary": "a"}])],
     "id 'd1' has more than one prediction; keep one per id"),
    ("score-a-bare-nan", lambda ws: ["score", "--predictions", str(write(ws / "nan.jsonl",
                                                                        '{"prediction": NaN, "summary": "a"}\n'))],
     "nan.jsonl, line 1: not valid JSON (NaN is not JSON)"),
    # Found while setting up, and refused before the run writes anything (run.json, tokenizer/, base/).
    ("train-prompt-budget-too-small", lambda ws: ["train", recipe_file(ws, TINY), "tokenizer.max_source_length=5"],
     "tokenizer.max_source_length: 5 tokens leave no room for the dialogue"),
    ("train-lora-target-the-model-lacks", lambda ws: ["train", recipe_file(ws, TINY), "adapter.target_modules=[nope]"],
     "adapter.target_modules: "),
    ("train-architecture-a-directory", lambda ws: ["train", recipe_file(ws, TINY), f"model.architecture={ws}"],
     "is a directory; expected the path of a config.json file"),
    ("train-architecture-broken-json", lambda ws: ["train", recipe_file(ws, TINY),
                                                   "model.architecture=" + str(write(ws / "config.json", '{"model_type": '))],
     "config.json is not a JSON config"),
    ("train-zero-heads", lambda ws: ["train", recipe_file(ws, TINY), "model.architecture.num_heads=0"],
     "model.architecture: num_heads is 0; expected a whole number of at least 1"),
    ("train-heads-that-do-not-divide-the-width", lambda ws: [
        "train", str(ROOT / "recipes" / "tiny" / "llama-lora.yaml"), "model.architecture.hidden_size=130"],
     "model.architecture: The hidden size (130) is not a multiple of the number of attention heads (4)"),
    ("train-a-size-of-the-wrong-type", lambda ws: ["train", recipe_file(ws, TINY), "model.architecture.d_kv=2.5"],
     "model.architecture: Field 'd_kv' expected int, got float"),
    ("train-an-evaluation-split-that-is-not-there", lambda ws: ["train", recipe_file(ws, TINY), "eval.after_training=true",
                                                                "eval.split=tset"],
     "the synthetic source has no split 'tset'"),
    ("train-output-dir-a-file", lambda ws: ["train", recipe_file(ws, TINY), f"output_dir={write(ws / 'out', 'x')}"],
     "out is a file; expected a directory"),
    ("train-output-dir-under-a-file", lambda ws: ["train", recipe_file(ws, TINY),
                                                  f"output_dir={write(ws / 'out', 'x')}/run"],
     "cannot be made:"),
    ("an-infinite-learning-rate", lambda ws: ["validate", recipe_file(ws, TINY), "train.learning_rate=.inf"],
     "train.learning_rate: got inf; input should be a finite number"),
    ("a-negative-seed", lambda ws: ["validate", recipe_file(ws, TINY), "train.seed=-1"],
     "train.seed: got -1; input should be greater than or equal to 0"),
    ("a-fifteen-digit-seed", lambda ws: ["validate", recipe_file(ws, TINY), "train.seed=123456789012345"],
     "train.seed: got 123456789012345; input should be less than 4294967296"),
    # Runs, checkpoints, launch.
    ("finished-output-dir", lambda ws: ["train", recipe_file(ws, TINY), f"output_dir={finished_run(ws)}"],
     "already holds a finished run; pass --overwrite to replace it"),
    ("rerun-of-a-run-that-saved-nothing", lambda ws: ["train", recipe_file(ws, TINY), f"output_dir={crashed_run(ws)}"],
     "already holds a running run; it saved no checkpoint to resume from; pass --overwrite to replace it"),
    ("rerun-of-a-stopped-run", lambda ws: ["train", recipe_file(ws, TINY), "output_dir=" + stopped_run_with(
        ws, {"trainer_state.json": "{}", "COMPLETE": ""})],
     "already holds a stopped run; pass --resume latest to continue it, or pass --overwrite to replace it"),
    ("resume-from-a-non-checkpoint", lambda ws: ["train", recipe_file(ws, TINY), "--resume", str(ws)],
     "not a complete dsum checkpoint (expected trainer_state.json and COMPLETE)"),
    ("corrupt-checkpoint", lambda ws: ["train", recipe_file(ws, TINY), "--resume", "latest",
                                       "output_dir=" + stopped_run_with(ws, {"trainer_state.json": '{"global_step": 4',
                                                                             "COMPLETE": ""})],
     "checkpoint is damaged"),
    ("eval-checkpoint-missing", lambda ws: ["eval", recipe_file(ws, TINY), "--checkpoint", str(ws / "nothing")],
     "no such directory"),
    ("eval-model-of-another-family", lambda ws: ["eval", str(ROOT / "recipes" / "tiny" / "llama-full.yaml"),
                                                 "--checkpoint", checkpoint(ws, "config.json", {"model_type": "t5",
                                                                                                "is_encoder_decoder": True})],
     "a t5 model, seq2seq, but the recipe's model.family is causal; evaluate it with the recipe it was trained with"),
    ("eval-adapter-of-another-family", lambda ws: ["eval", recipe_file(ws, TINY), "--checkpoint",
                                                   checkpoint(ws, "adapter_config.json", {"task_type": "CAUSAL_LM"})],
     "a CAUSAL_LM adapter, but the recipe's model.family is seq2seq"),
    ("eval-an-adapter-config-cut-short", lambda ws: ["eval", recipe_file(ws, TINY), "--checkpoint", str(write(
        (ws / "cut").mkdir() or ws / "cut" / "adapter_config.json", '{"task_type": "SEQ_2_SEQ_LM", ').parent)],
     "cut: adapter_config.json does not read (Expecting property name"),
    ("eval-an-adapter-config-that-is-a-list", lambda ws: ["eval", recipe_file(ws, TINY), "--checkpoint", str(write(
        (ws / "listed").mkdir() or ws / "listed" / "adapter_config.json", "[1, 2]").parent)],
     "listed: adapter_config.json holds a list; expected the JSON object peft writes"),
    ("eval-a-model-config-cut-short", lambda ws: ["eval", recipe_file(ws, TINY), "--checkpoint", str(write(
        (ws / "cutmodel").mkdir() or ws / "cutmodel" / "config.json", '{"model_type": "t5", ').parent)],
     "cutmodel: config.json does not read as a model config"),
    ("eval-a-checkpoint-whose-base-is-gone", lambda ws: [
        "eval", recipe_file(ws, TINY), "--checkpoint", str(fake_run(ws, "t5-lora", base=False) / "checkpoints" /
                                                           "step-00000004")],
     "run-of-t5-lora/checkpoints/step-00000004: its random-init base is not in"),
    ("eval-a-checkpoint-whose-tokenizer-is-gone", lambda ws: [
        "eval", recipe_file(ws, TINY), "--checkpoint", str(fake_run(ws, "t5-lora", tokenizer=False) / "checkpoints" /
                                                           "step-00000004")],
     "step-00000004: no tokenizer: it holds none, and its run's trained tokenizer is not in"),
    ("eval-merging-a-qlora-checkpoint", lambda ws: ["eval", recipe_file(ws, TINY), "eval.merge_adapter=true",
                                                    "--checkpoint", str(fake_run(ws, "t5-qlora") / "final")],
     "eval.merge_adapter: --checkpoint "),
    ("eval-a-base-without-a-checkpoint", lambda ws: ["eval", recipe_file(ws, TINY), "--base", "google/flan-t5-base"],
     "--base: it names the base of --checkpoint's adapter; to evaluate a base model alone, set model.name_or_path"),
    ("eval-a-base-that-is-not-there", lambda ws: ["eval", recipe_file(ws, TINY), "--checkpoint", str(fake_adapter(ws)),
                                                  "--base", str(ws / "nowhere")],
     "nowhere: no such directory; expected a model directory or a Hub id"),
    # dsum export.
    ("export-into-a-directory-that-is-not-empty", lambda ws: [
        "export", str(fake_final(ws)), "--out", str(write((ws / "out").mkdir() or ws / "out" / "mine.txt", "x").parent)],
     "out is not empty; pass --overwrite to replace what it holds, or choose another directory"),
    ("export-into-a-file", lambda ws: ["export", str(fake_final(ws)), "--out", str(write(ws / "out.txt", "x"))],
     "out.txt is a file; expected a directory"),
    ("export-into-the-checkpoint-it-reads", lambda ws: ["export", str(fake_final(ws)), "--out",
                                                        str(ws / "final" / "exported")],
     "exported: it holds, or is part of, what the export reads"),
    ("export-over-the-run-it-reads", lambda ws: ["export", str(fake_run(ws, "t5-lora")), "--out",
                                                 str(ws / "run-of-t5-lora" / "base"), "--overwrite"],
     "base: it holds, or is part of, what the export reads"),
    ("export-a-run-that-has-not-finished", lambda ws: ["export", stopped_run_with(
        ws, {"trainer_state.json": "{}", "COMPLETE": ""}), "--out", str(ws / "out")],
     "a run with no final/ (it has not finished training); name one of its checkpoints instead, such as"),
    ("export-an-incomplete-checkpoint", lambda ws: ["export", str(write(
        (ws / "step").mkdir() or ws / "step" / "trainer_state.json", "{}").parent), "--out", str(ws / "out")],
     "step: an incomplete checkpoint (no COMPLETE: its save did not finish); name an earlier one"),
    ("export-a-directory-of-no-checkpoint", lambda ws: ["export", str(ws), "--out", str(ws.parent / "out")],
     "not a checkpoint dsum wrote; expected a run, its final/"),
    ("export-merging-a-full-model", lambda ws: ["export", str(fake_final(ws)), "--out", str(ws / "out"), "--merge"],
     "final is a full model; there is no adapter to merge"),
    ("export-a-base-for-a-full-model", lambda ws: ["export", str(fake_final(ws)), "--out", str(ws / "out"), "--base",
                                                   "google/flan-t5-base"],
     "is a full model, which needs no base"),
    ("export-a-bare-adapter-in-another-dtype", lambda ws: ["export", str(fake_adapter(ws)), "--out", str(ws / "out"),
                                                           "--dtype", "bf16"],
     "holds an adapter, which is exported as it was saved; --dtype sets the weights of a full model"),
    # Weights cut short (a copy that did not finish): one line, whether saved mid-run or in final/.
    ("export-a-checkpoint-whose-weights-are-cut-short", lambda ws: [
        "export", str(with_tokenizer(fake_run(ws, "t5-full")) / "checkpoints" / "step-00000004"), "--out",
        str(ws / "out")], "step-00000004: its weights do not read (SafetensorError: "),
    ("export-a-checkpoint-whose-run-tokenizer-does-not-read", lambda ws: [
        "export", str(fake_run(ws, "t5-full") / "checkpoints" / "step-00000004"), "--out", str(ws / "out")],
     "tokenizer does not read as a tokenizer (KeyError: 'added_tokens')"),
    ("eval-a-final-whose-weights-are-cut-short", lambda ws: [
        "eval", recipe_file(ws, TINY), "--checkpoint", str(write(fake_final(ws) / "model.safetensors", "weig").parent)],
     "model: cannot load "),
    ("export-t5-in-fp16", lambda ws: ["export", str(fake_final(ws)), "--out", str(ws / "out"), "--dtype", "fp16"],
     "--dtype fp16: fp16 overflows in T5 models; use bf16 or fp32"),
    ("unknown-accelerate-config", lambda ws: ["submit", recipe_file(ws, TINY), "--nodes", "1", "--gpus-per-node", "1",
                                              "--accelerate", "zero9", "--dry-run"],
     "--accelerate zero9: no such config; expected one of"),
    ("submit-without-sbatch", lambda ws: ["submit", recipe_file(ws, TINY), "--nodes", "1", "--gpus-per-node", "1"],
     "sbatch is not on PATH"),
    # A line break in what reaches the batch script would end an #SBATCH line or a comment and start a command.
    ("submit-a-partition-with-a-line-break", lambda ws: [
        "submit", recipe_file(ws, TINY), "--nodes", "1", "--gpus-per-node", "1", "--partition",
        f"gpu\ntouch {ws / 'ran'}", "--dry-run"], "--partition: holds a control character ('\\n')"),
    ("submit-an-sbatch-option-with-a-line-break", lambda ws: [
        "submit", recipe_file(ws, TINY), "--nodes", "1", "--gpus-per-node", "1", "--sbatch=--mem=1G\rx",
        "--dry-run"], "holds a control character ('\\r')"),
    ("submit-an-output-dir-with-a-line-break", lambda ws: [
        "submit", recipe_file(ws, TINY), "--nodes", "1", "--gpus-per-node", "1", f"output_dir={ws}/a\nb",
        "--dry-run"], "output_dir: holds a control character ('\\n')"),
    ("bench-dsum-setting-the-other-ways-read", lambda ws: ["bench", "--workdir", str(ws / "bench"), "--dsum",
                                                          "train.learning_rate=1"],
     "--dsum train.learning_rate=1: expected KEY=VALUE, KEY one of train.group_by_length,"),
    ("bench-dsum-value-a-model-refuses", lambda ws: ["bench", "--workdir", str(ws / "bench"), "--dsum",
                                                     "train.packing=true"],
     "--dsum: dsum bench recipe for t5: train.packing puts examples end to end in one decoder row, which only causal"),
    ("bench-profile-into-a-file", lambda ws: ["bench", "--workdir", str(ws / "bench"), "--profile",
                                              predictions(ws, [], "profile.txt")],
     "profile.txt: it is a file; expected a directory for the profile files (made if missing)"),
    ("bench-goals-profile-under-a-file", lambda ws: ["bench", "--goals", "--workdir", str(ws / "bench"), "--profile",
                                                     str(Path(predictions(ws, [], "profile.txt")) / "t5")],
     "profile.txt is a file; expected a directory for the profile files (made if missing)"),
    ("bench-record-and-json", lambda ws: ["bench", "--workdir", str(ws / "bench"), "--record", "--json",
                                          str(ws / "bench.json")],
     "--record: it names the results file itself, under benchmarks/results/; give --record or --json, not both"),
]


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(("make_args", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_refused_in_one_line(tmp_path, monkeypatch, capsys, make_args, expected):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", os.path.dirname(shutil.which("python3") or "/usr/bin"))  # no sbatch here
    ws = tmp_path / "ws"
    ws.mkdir()
    args = make_args(ws)
    if args[0] in ("train", "validate", "eval", "submit") and not any(a.startswith("output_dir=") for a in args):
        args.append(f"output_dir={ws / 'run'}")
    if args[0] in ("train", "validate"):
        args += SMALL
    before = snapshot(ws)
    status = main(args)
    err = capsys.readouterr().err
    assert status == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("dsum: error: "), err
    assert expected in lines[0], err
    assert "Traceback" not in err
    assert snapshot(ws) == before, "a file was changed or written"


def test_the_catalogue_is_long_enough():
    assert len(CASES) >= 70


def test_a_hub_model_out_of_reach_says_how_to_fail_at_once(monkeypatch):
    """Without a cached copy and without internet, huggingface_hub retries for about 25 s a file before
    it gives up; the error then says how to get it at once (HF_HUB_OFFLINE=1) or avoid it (a local path)."""
    from huggingface_hub import constants

    from dsum.config import RecipeError, load_recipe
    from dsum.modeling import cannot_load, load_tokenizer

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # the real failure, without the retries
    with pytest.raises(RecipeError) as offline:
        load_tokenizer(load_recipe(ROOT / "recipes" / "flan-t5-base" / "lora.yaml"), ROOT / "never")
    unreachable = offline.value.__context__
    assert str(offline.value).startswith("tokenizer: cannot load 'google/flan-t5-base' (We couldn't connect")
    assert "HF_HUB_OFFLINE" not in str(offline.value)  # set already: nothing to suggest

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    hinted = str(cannot_load("tokenizer", "google/flan-t5-base", unreachable))
    assert hinted.endswith("; without internet, give a local directory, or set HF_HUB_OFFLINE=1 to use the Hub "
                           "cache alone")
    typo = OSError("org/typo is not a local folder and is not a valid model identifier listed on the Hub")
    assert "HF_HUB_OFFLINE" not in str(cannot_load("model.name_or_path", "org/typo", typo))
