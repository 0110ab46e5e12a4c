"""Dialogue/summary data: turns a recipe's `data` section into lists of `Example`s, one list per split. It owns
the sources (synthetic corpus, local split files, Hub datasets), the mapping of their columns onto `Example` and the
cleaning and merging policy; nothing else in dsum reads data."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from dsum.config import DataConfig, RecipeError
from dsum.data.example import Example
from dsum.data.sources import RawSplit, read_hub_split, read_local_split

__all__ = ["Example", "load_split", "rows_to_examples"]

logger = logging.getLogger(__name__)

_NUMBERED_SUMMARY = re.compile(r"summary(\d+)")
_TRAILING_NUMBER = re.compile(r"(.+)_\d+")


def load_split(cfg: DataConfig, split: str) -> list[Example]:
    """The examples of `split` from `cfg.source`: 'synthetic', a local directory, or a Hub dataset id.

    Policy for files and Hub datasets (the synthetic corpus is generated clean and distinct):
    - Text is stripped of surrounding whitespace. A row whose dialogue is empty, or whose references
      are all empty, is skipped, and the number skipped is logged as a warning; empty references
      next to non-empty ones are dropped.
    - Rows with identical dialogue text are merged into one `Example`, in order of first appearance,
      their references concatenated in row order (identical references are kept: they are separate
      references). So the Hub's flattened DialogSum test split (one row per reference, ids
      `test_0_1`, `test_0_2`, ...) reads the same as the authors' file (one row with `summary1..3`).
      The merged id is the first row's id less a trailing `_<digits>` when every merged row's id is
      that prefix plus `_<digits>`, else the first row's id; an unmerged row keeps its id. The same
      rule applies to every split (train splits normally have nothing to merge).
    - Two different dialogues with the same id, or a split with no usable rows, are errors.
    - `max_train_samples` keeps the first N examples of the train split, after merging.
    """
    if cfg.source == "synthetic":
        examples = _synthetic_split(cfg, split)
    else:
        raw = _read_split(cfg.source, split)
        examples, skipped = rows_to_examples(raw, cfg)
        if skipped:
            logger.warning("skipped %d row(s) of split %r with an empty dialogue or no non-empty reference (%s)",
                           skipped, split, raw.where)
    if split == cfg.train_split and cfg.max_train_samples is not None:
        examples = examples[: cfg.max_train_samples]
    return examples


def _synthetic_split(cfg: DataConfig, split: str) -> list[Example]:
    from dsum.data import synthetic

    sizes = {
        cfg.train_split: ("train", cfg.synthetic.train_size),
        cfg.validation_split: ("validation", cfg.synthetic.validation_size),
        "test": ("test", cfg.synthetic.test_size),
    }
    if split not in sizes:
        names = ", ".join(repr(name) for name in sizes)
        raise RecipeError(f"the synthetic source has no split {split!r}; its splits are {names}")
    role, size = sizes[split]
    return synthetic.generate(role, size, cfg.synthetic.seed)


def _read_split(source: str, split: str) -> RawSplit:
    path = Path(source).expanduser()
    if path.is_dir():
        return read_local_split(path, split)
    if path.exists():
        raise RecipeError(f"data.source {source!r} is a file; expected a directory holding {split}.jsonl/.csv/.parquet")
    if source.startswith((".", "/", "~")) or "\\" in source:
        raise RecipeError(f"data.source {source!r}: no such directory")
    return read_hub_split(source, split)


# ----------------------------------------------------------------------------------------------
# Rows to examples


def rows_to_examples(raw: RawSplit, cfg: DataConfig) -> tuple[list[Example], int]:
    """Map, clean and merge raw rows (see the module docstring); returns the examples and the rows skipped."""
    if not raw.rows:
        raise RecipeError(f"{raw.where}: the split is empty (no rows)")
    dialogue_field = _require(cfg.dialogue_field, raw, "data.dialogue_field")
    summary_fields = _summary_fields(raw, cfg)
    id_field = _id_field(raw, cfg)

    groups: dict[str, list[tuple[str, list[str]]]] = {}  # dialogue -> [(row id, references)], in order
    first_row: dict[str, int] = {}
    skipped = 0
    for number, row in enumerate(raw.rows):
        dialogue = _text(row.get(dialogue_field), raw, number)
        references = [ref for field in summary_fields for ref in _texts(row.get(field), raw, number)]
        if not dialogue or not references:
            skipped += 1
            continue
        row_id = str(number) if id_field is None else _text(row.get(id_field), raw, number)
        if not row_id:
            raise RecipeError(f"{raw.where}: row {number} has an empty {id_field!r}")
        groups.setdefault(dialogue, []).append((row_id, references))
        first_row.setdefault(dialogue, number)

    if not groups:
        raise RecipeError(
            f"{raw.where}: no usable rows ({len(raw.rows)} row(s), {skipped} with an empty dialogue or no reference)"
        )
    examples = [
        Example(_merged_id([row_id for row_id, _ in rows]), dialogue, tuple(ref for _, refs in rows for ref in refs))
        for dialogue, rows in groups.items()
    ]
    _check_unique_ids(examples, list(first_row.values()), raw)
    return examples, skipped


def _require(field: str, raw: RawSplit, key: str) -> str:
    if field not in raw.columns:
        raise RecipeError(
            f"{raw.where}: no column {field!r} ({key}); its columns are {', '.join(map(repr, raw.columns)) or 'none'}"
        )
    return field


def _summary_fields(raw: RawSplit, cfg: DataConfig) -> list[str]:
    if cfg.summary_fields is not None:
        return [_require(field, raw, "data.summary_fields") for field in cfg.summary_fields]
    if "summary" in raw.columns:
        return ["summary"]
    numbered = [(int(m.group(1)), col) for col in raw.columns if (m := _NUMBERED_SUMMARY.fullmatch(col))]
    if not numbered:
        raise RecipeError(
            f"{raw.where}: no 'summary' or 'summary1', 'summary2', ... column; set data.summary_fields "
            f"(its columns are {', '.join(map(repr, raw.columns)) or 'none'})"
        )
    return [col for _, col in sorted(numbered)]


def _id_field(raw: RawSplit, cfg: DataConfig) -> str | None:
    """The id column; None means ids are the 0-based row numbers."""
    if cfg.id_field is not None:
        return _require(cfg.id_field, raw, "data.id_field")
    return next((field for field in ("id", "fname") if field in raw.columns), None)


def _text(value: Any, raw: RawSplit, number: int) -> str:
    """One cell as stripped text: None is empty, a list of turns is joined by newlines."""
    if value is None:
        return ""
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            raise RecipeError(f"{raw.where}: row {number} holds bytes that are not UTF-8 text") from None
    if isinstance(value, (list, tuple)):
        return "\n".join(_text(item, raw, number) for item in value).strip()
    return str(value).strip()


def _texts(value: Any, raw: RawSplit, number: int) -> list[str]:
    """The non-empty references in one cell: a list cell holds several."""
    items = value if isinstance(value, (list, tuple)) else [value]
    return [text for item in items if (text := _text(item, raw, number))]


def _merged_id(ids: list[str]) -> str:
    if len(ids) == 1:
        return ids[0]
    match = _TRAILING_NUMBER.fullmatch(ids[0])
    if match and all(re.fullmatch(re.escape(match.group(1)) + r"_\d+", row_id) for row_id in ids):
        return match.group(1)
    return ids[0]


def _check_unique_ids(examples: list[Example], rows: list[int], raw: RawSplit) -> None:
    seen: dict[str, int] = {}
    for example, number in zip(examples, rows):
        if example.id in seen:
            rows_named = f"rows {seen[example.id]} and {number}"
            raise RecipeError(f"{raw.where}: id {example.id!r} is used by two different dialogues ({rows_named})")
        seen[example.id] = number
