"""dsum.data: the synthetic corpus, local split files, field mapping, merging and the errors people see."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import DIALOGSUM
from dsum.config import DataConfig, RecipeError, SyntheticConfig
from dsum.data import Example, load_split, rows_to_examples
from dsum.data import synthetic
from dsum.data.sources import RawSplit

REPO = Path(__file__).resolve().parents[1]

ROWS = [
    {"id": "a", "dialogue": "#Person1#: Hi.\n#Person2#: Hello, Tom.", "summary": "Two people greet.", "topic": "hello"},
    {"id": "b", "dialogue": "#Person1#: Bye.\n#Person2#: See you.", "summary": "They say goodbye.", "topic": "bye"},
]
EXPECTED = [
    Example("a", "#Person1#: Hi.\n#Person2#: Hello, Tom.", ("Two people greet.",)),
    Example("b", "#Person1#: Bye.\n#Person2#: See you.", ("They say goodbye.",)),
]


def write_split(directory: Path, split: str, rows: list[dict], fmt: str = "jsonl") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{split}.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    elif fmt == "csv":
        with path.open("w", encoding="utf-8", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def local(directory: Path, **fields) -> DataConfig:
    return DataConfig(source=str(directory), **fields)


def raw(rows: list[dict]) -> RawSplit:
    return RawSplit(rows, list(dict.fromkeys(key for row in rows for key in row)), where="rows")


# ----------------------------------------------------------------------------------------------
# Synthetic corpus


SMALL = DataConfig(synthetic=SyntheticConfig(train_size=300, validation_size=40, test_size=50, seed=7))


def test_synthetic_is_deterministic_within_a_process():
    assert load_split(SMALL, "train") == load_split(SMALL.model_copy(deep=True), "train")
    other = SMALL.model_copy(update={"synthetic": SyntheticConfig(train_size=300, seed=8)})
    assert [e.dialogue for e in load_split(other, "train")] != [e.dialogue for e in load_split(SMALL, "train")]


def _digest(examples: list[Example]) -> str:
    return hashlib.sha256(repr(examples).encode()).hexdigest()


def test_synthetic_is_identical_across_processes():
    code = (
        "import hashlib; from dsum.data import synthetic; "
        "print(hashlib.sha256(repr(synthetic.generate('validation', 40, 7)).encode()).hexdigest())"
    )
    digests = set()
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        digests.add(done.stdout.strip())
    assert digests == {_digest(load_split(SMALL, "validation"))}


def test_synthetic_splits_have_their_sizes_and_share_no_dialogue():
    splits = {name: load_split(SMALL, name) for name in ("train", "validation", "test")}
    assert {name: len(examples) for name, examples in splits.items()} == {"train": 300, "validation": 40, "test": 50}
    dialogues = {name: {e.dialogue for e in examples} for name, examples in splits.items()}
    assert all(len(dialogues[name]) == len(splits[name]) for name in splits)  # no repeats within a split
    assert not dialogues["train"] & dialogues["validation"]
    assert not dialogues["train"] & dialogues["test"]
    assert not dialogues["validation"] & dialogues["test"]
    assert all(synthetic.split_of(e.dialogue) == name for name, examples in splits.items() for e in examples)
    assert splits["train"][42].id == "synthetic-train-000042"
    assert splits["test"][0].id == "synthetic-test-000000"


def test_synthetic_dialogues_look_like_dialogsum():
    examples = load_split(SMALL, "train")
    for example in examples:
        turns = example.dialogue.split("\n")
        assert 4 <= len(turns) <= 8
        assert all(turn.startswith(f"#Person{i % 2 + 1}#: ") for i, turn in enumerate(turns))
        assert 40 <= sum(len(turn.split()) - 1 for turn in turns) <= 90
        (summary,) = example.references
        assert 10 <= len(summary.split()) <= 20 and summary.endswith(".") and "{" not in summary
        subject = summary.split()[0]  # a name only when the dialogue states it, else a speaker tag
        assert re.fullmatch(r"#Person[12]#", subject) or re.search(rf"\b{subject}\b", example.dialogue)
    assert len({e.references[0].split()[1] for e in examples}) >= 8  # many scenarios (verbs) in use
    assert any(e.references[0].startswith("#Person") for e in examples)
    assert any(not e.references[0].startswith("#Person") for e in examples)


def test_synthetic_split_names_follow_the_config_and_max_train_samples_caps_train_only():
    renamed = SMALL.model_copy(update={"train_split": "training", "validation_split": "dev", "max_train_samples": 10})
    assert load_split(renamed, "training") == load_split(SMALL, "train")[:10]
    assert load_split(renamed, "dev") == load_split(SMALL, "validation")
    with pytest.raises(RecipeError, match="no split 'train'.*'training', 'dev', 'test'"):
        load_split(renamed, "train")
    with pytest.raises(RecipeError, match="synthetic split 'dev'"):
        synthetic.generate("dev", 3, 0)


def test_synthetic_never_repeats_a_dialogue_and_says_when_it_runs_out(monkeypatch):
    pool = [(e.dialogue, e.references[0]) for e in synthetic.generate("train", 3, 0)]
    draws = iter(pool * 1000)
    monkeypatch.setattr(synthetic, "compose", lambda rng: next(draws))
    with pytest.raises(RecipeError, match="could only make 3 distinct dialogues of 5"):
        synthetic.generate("train", 5, 0)


# ----------------------------------------------------------------------------------------------
# Local split files


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_local_formats_load_the_same_examples(tmp_path, fmt):
    write_split(tmp_path, "validation", ROWS, fmt)
    assert load_split(local(tmp_path), "validation") == EXPECTED


def test_jsonl_blank_lines_are_skipped(tmp_path):
    (tmp_path / "train.jsonl").write_text("\n" + json.dumps(ROWS[0]) + "\n\n   \n" + json.dumps(ROWS[1]) + "\n")
    assert load_split(local(tmp_path), "train") == EXPECTED


def test_max_train_samples_caps_only_the_train_split(tmp_path):
    rows = [{"id": f"r{i}", "dialogue": f"#Person1#: line {i}", "summary": f"s {i}"} for i in range(5)]
    write_split(tmp_path, "train", rows)
    write_split(tmp_path, "validation", rows)
    cfg = local(tmp_path, max_train_samples=2)
    assert [e.id for e in load_split(cfg, "train")] == ["r0", "r1"]
    assert len(load_split(cfg, "validation")) == 5


def test_named_fields_map_onto_example(tmp_path):
    rows = [{"key": "k1", "text": "#Person1#: A.", "ref_a": "first", "ref_b": "second", "summary": "ignored"}]
    write_split(tmp_path, "train", rows, "csv")
    cfg = local(tmp_path, dialogue_field="text", summary_fields=["ref_b", "ref_a"], id_field="key")
    assert load_split(cfg, "train") == [Example("k1", "#Person1#: A.", ("second", "first"))]


def test_numbered_summaries_are_found_in_numeric_order_and_ids_fall_back(tmp_path):
    row = {"fname": "f0", "dialogue": "#Person1#: A.", "summary10": "ten", "summary2": "two", "summary1": "one"}
    write_split(tmp_path, "test", [row])
    assert load_split(local(tmp_path), "test") == [Example("f0", "#Person1#: A.", ("one", "two", "ten"))]
    # "id" wins over "fname"; with neither, the 0-based row number is the id
    both = [{"fname": "f", "id": "i", "dialogue": "d", "summary": "s"}]
    assert rows_to_examples(raw(both), DataConfig())[0][0].id == "i"
    neither = [{"dialogue": "d0", "summary": "s"}, {"dialogue": "d1", "summary": "s"}]
    assert [e.id for e in rows_to_examples(raw(neither), DataConfig())[0]] == ["0", "1"]


def test_empty_rows_are_skipped_counted_and_logged(tmp_path, caplog):
    rows = [
        {"id": "ok", "dialogue": " #Person1#: Hi. ", "summary1": "kept ", "summary2": "  "},
        {"id": "no-dialogue", "dialogue": "  ", "summary1": "s", "summary2": "s"},
        {"id": "no-summary", "dialogue": "#Person1#: Yo.", "summary1": "", "summary2": None},
    ]
    write_split(tmp_path, "train", rows)
    with caplog.at_level(logging.WARNING, logger="dsum.data"):
        assert load_split(local(tmp_path), "train") == [Example("ok", "#Person1#: Hi.", ("kept",))]
    assert "skipped 2 row(s) of split 'train'" in caplog.text
    assert rows_to_examples(raw(rows), DataConfig())[1] == 2


# ----------------------------------------------------------------------------------------------
# The two DialogSum layouts


def test_flattened_test_layout_merges_to_the_authors_layout(tmp_path):
    dialogues = [f"#Person1#: Hello {k}.\n#Person2#: Hi." for k in range(3)]
    authors = [
        {"fname": f"test_{k}", "dialogue": d, "summary1": f"s{k}a", "topic1": "t", "summary2": f"s{k}b",
         "topic2": "t", "summary3": f"s{k}a", "topic3": "t"}
        for k, d in enumerate(dialogues)
    ]  # fmt: skip
    # one row per reference, repeats not adjacent; the repeated reference s{k}a stays two references
    flat = [
        {"id": f"test_{k}_{j + 1}", "dialogue": dialogues[k], "summary": authors[k][f"summary{j + 1}"], "topic": "t"}
        for j in range(3)
        for k in range(3)
    ]
    write_split(tmp_path / "authors", "test", authors)
    write_split(tmp_path / "hub", "test", flat, "parquet")
    from_authors = load_split(local(tmp_path / "authors"), "test")
    assert from_authors == load_split(local(tmp_path / "hub"), "test")
    assert from_authors[1] == Example("test_1", dialogues[1], ("s1a", "s1b", "s1a"))


def test_merged_id_keeps_the_first_id_when_the_prefixes_differ():
    rows = [
        {"id": "x_1", "dialogue": "same", "summary": "a"},
        {"id": "y_2", "dialogue": "same", "summary": "b"},
        {"id": "z_1", "dialogue": "alone", "summary": "c"},
    ]
    examples, _ = rows_to_examples(raw(rows), DataConfig())
    assert examples == [Example("x_1", "same", ("a", "b")), Example("z_1", "alone", ("c",))]


def test_real_dialogsum_copy_loads():
    assert DIALOGSUM.is_dir(), f"the DialogSum copy is missing at {DIALOGSUM}"
    cfg = local(DIALOGSUM)
    test = load_split(cfg, "test")
    assert len(test) == 500 and all(len(e.references) == 3 for e in test)
    assert test[0].id == "test_0" and test[0].dialogue.startswith("#Person1#: Ms. Dawson")
    train = load_split(cfg, "train")
    assert len(train) == 12460 and train[0].id == "train_0" and len(train[0].references) == 1
    assert len(load_split(cfg, "validation")) == 500


# ----------------------------------------------------------------------------------------------
# Errors


def test_missing_named_field_names_field_file_and_columns(tmp_path):
    path = write_split(tmp_path, "train", ROWS)
    with pytest.raises(RecipeError, match=r"no column 'text'.*'id', 'dialogue', 'summary', 'topic'") as err:
        load_split(local(tmp_path, dialogue_field="text"), "train")
    assert str(path) in str(err.value)
    with pytest.raises(RecipeError, match=r"no column 'abstract' \(data.summary_fields\)"):
        load_split(local(tmp_path, summary_fields=["summary", "abstract"]), "train")
    with pytest.raises(RecipeError, match=r"no column 'key' \(data.id_field\)"):
        load_split(local(tmp_path, id_field="key"), "train")


def test_no_summary_column_is_explained(tmp_path):
    write_split(tmp_path, "train", [{"dialogue": "d", "abstract": "a"}])
    with pytest.raises(RecipeError, match=r"no 'summary' or 'summary1'.*data.summary_fields.*'abstract'"):
        load_split(local(tmp_path), "train")


def test_missing_or_ambiguous_split_file(tmp_path):
    write_split(tmp_path, "train", ROWS)
    with pytest.raises(RecipeError, match=r"split 'test' in .*expected one of test.jsonl.*present: train.jsonl"):
        load_split(local(tmp_path), "test")
    write_split(tmp_path, "train", ROWS, "csv")
    with pytest.raises(RecipeError, match=r"several files \(train.jsonl, train.csv\)"):
        load_split(local(tmp_path), "train")


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_empty_file_is_an_empty_split(tmp_path, fmt):
    path = tmp_path / f"validation.{fmt}"
    path.write_text("")
    with pytest.raises(RecipeError, match="the split is empty") as err:
        load_split(local(tmp_path), "validation")
    assert str(path) in str(err.value)


def test_split_with_only_empty_rows_is_an_error(tmp_path):
    write_split(tmp_path, "train", [{"id": "a", "dialogue": " ", "summary": "s"}])
    with pytest.raises(RecipeError, match=r"no usable rows \(1 row\(s\), 1 with an empty"):
        load_split(local(tmp_path), "train")


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_non_utf8_file_is_named(tmp_path, fmt):
    path = tmp_path / f"train.{fmt}"
    path.write_bytes(b"id,dialogue,summary\n1,caf\xe9,s\n" if fmt == "csv" else b'{"dialogue": "caf\xe9"}\n')
    with pytest.raises(RecipeError, match="not UTF-8") as err:
        load_split(local(tmp_path), "train")
    assert str(path) in str(err.value)


def test_ragged_csv_names_file_and_line(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text('id,dialogue,summary\n1,"#Person1#: a\n#Person2#: b",s\n2,d,s,extra\n', encoding="utf-8")
    with pytest.raises(RecipeError, match=r"line 4: 4 fields but the header has 3") as err:
        load_split(local(tmp_path), "train")
    assert str(path) in str(err.value)


def test_invalid_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n{not json\n", encoding="utf-8")
    with pytest.raises(RecipeError, match=r"line 2: not valid JSON") as err:
        load_split(local(tmp_path), "train")
    assert str(path) in str(err.value)


def test_duplicate_id_with_different_dialogues_is_named(tmp_path):
    rows = [{"id": "x", "dialogue": "one", "summary": "s"}, {"id": "x", "dialogue": "two", "summary": "s"}]
    write_split(tmp_path, "train", rows)
    with pytest.raises(RecipeError, match=r"id 'x' is used by two different dialogues"):
        load_split(local(tmp_path), "train")
    # the same id on the same dialogue is one example with two references
    same = [{"id": "x", "dialogue": "one", "summary": "s"}, {"id": "x", "dialogue": "one", "summary": "t"}]
    assert rows_to_examples(raw(same), DataConfig())[0] == [Example("x", "one", ("s", "t"))]


def test_unloadable_hub_dataset_says_so(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hugging Face Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(RecipeError, match=r"'someone/dialogs'.*could not load split 'train' from the Hugging Face Hub.*"
                                          r"local directory.*'synthetic'"):
        load_split(DataConfig(source="someone/dialogs"), "train")


def test_path_like_source_that_does_not_exist(tmp_path):
    with pytest.raises(RecipeError, match="no such directory"):
        load_split(DataConfig(source=str(tmp_path / "missing")), "train")
    write_split(tmp_path, "train", ROWS)
    with pytest.raises(RecipeError, match="is a file"):
        load_split(DataConfig(source=str(tmp_path / "train.jsonl")), "train")


def test_a_line_separator_inside_a_jsonl_string_is_text_not_a_line_break(tmp_path):
    """JSON Lines ends a line at "\n" alone; U+2028 and U+2029 are legal inside a JSON string (and written
    raw with ensure_ascii=False, as dsum's predictions.jsonl is), as is a form feed escaped."""
    from dsum.config import DataConfig
    from dsum.data import load_split

    dialogue = "#Person1#: One\u2028two.\n#Person2#: Three\u2029four\x0c."
    rows = [{"id": str(i), "dialogue": f"{dialogue} {i}", "summary": f"Summary {i}."} for i in range(3)]
    for split in ("train", "validation", "test"):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in rows),
                                                  encoding="utf-8")
    examples = load_split(DataConfig(source=str(tmp_path)), "test")
    assert [e.dialogue for e in examples] == [r["dialogue"] for r in rows]
