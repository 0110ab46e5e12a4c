"""`dsum score`: ROUGE for outputs made anywhere, read from .jsonl, .csv or .txt files."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Sequence

from dsum.config import RecipeError
from dsum.data.sources import SPLIT_FORMATS, RawSplit, decode, read_table, text_lines

_NUMBERED = re.compile(r"summary(\d+)")


def read_rows(path: Path, text_field: str) -> RawSplit:
    """A table's rows; a .txt file gives one row per line with the text under `text_field`."""
    if path.suffix == ".txt":
        if not path.is_file():
            raise RecipeError(f"{path}: no such file")
        lines = text_lines(decode(path))
        return RawSplit([{text_field: line} for line in lines], [text_field], where=str(path))
    if path.suffix not in SPLIT_FORMATS:
        raise RecipeError(f"{path}: expected a .jsonl, .csv, .parquet or .txt file")
    return read_table(path)


def reference_fields(raw: RawSplit, asked: Sequence[str] | None) -> list[str]:
    """The reference columns: those asked for, else `references`, then `summary`, then `summary1`, `summary2`, ..."""
    if asked:
        missing = [f for f in asked if f not in raw.columns]
        if missing:
            raise RecipeError(f"{raw.where}: no column {missing[0]!r} (--reference-field); its columns are "
                              f"{', '.join(map(repr, raw.columns))}")
        return list(asked)
    for name in ("references", "summary"):
        if name in raw.columns:
            return [name]
    numbered = sorted((int(m.group(1)), c) for c in raw.columns if (m := _NUMBERED.fullmatch(c)))
    if numbered:
        return [c for _, c in numbered]
    raise RecipeError(f"{raw.where}: no 'references', 'summary' or 'summary1', ... column; name one with "
                      f"--reference-field (its columns are {', '.join(map(repr, raw.columns))})")


def load_pairs(predictions: Path, references: Path | None, prediction_field: str,
               reference_field: Sequence[str] | None, id_field: str | None) -> tuple[list[str], list[list[str]]]:
    """Predictions and their reference lists, aligned.

    Predictions and references may sit in one file (columns of the same rows) or two; two files are matched by
    an id column when both have it, otherwise by order. A reference cell may hold a list (several references),
    and several reference columns may be named.
    """
    preds = read_rows(predictions, prediction_field)
    if prediction_field not in preds.columns:
        raise RecipeError(f"{preds.where}: no column {prediction_field!r} (--prediction-field); its columns are "
                          f"{', '.join(map(repr, preds.columns))}")
    refs = preds if references is None else read_rows(references, (reference_field or ["reference"])[0])
    fields = reference_fields(refs, reference_field or (["reference"] if refs.where.endswith(".txt") else None))
    check_one_prediction_per_id(preds, id_field or "id")
    texts = [str(row.get(prediction_field) or "").strip() for row in preds.rows]
    ref_lists = [references_of(row, fields) for row in refs.rows]
    if references is not None:
        key = id_field or ("id" if "id" in preds.columns and "id" in refs.columns else None)
        if key is not None:
            return align_by_id(preds, refs, key, texts, ref_lists)
        if len(texts) != len(ref_lists):
            raise RecipeError(f"{preds.where}: {len(texts)} predictions for {len(ref_lists)} references in {refs.where}; "
                              "matched by order they must be as many")
    empty = [i for i, r in enumerate(ref_lists) if not r]
    if empty:
        raise RecipeError(f"{refs.where}: row {empty[0]} has no reference text in {', '.join(fields)}")
    return texts, ref_lists


def check_one_prediction_per_id(preds: RawSplit, key: str) -> None:
    """A dialogue predicted twice would be scored twice, and weigh twice in the means."""
    if key not in preds.columns:
        return
    seen: set[str] = set()
    for row in preds.rows:
        if str(row[key]) in seen:
            raise RecipeError(f"{preds.where}: id {str(row[key])!r} has more than one prediction; keep one per id")
        seen.add(str(row[key]))


def references_of(row: dict[str, Any], fields: Sequence[str]) -> list[str]:
    out: list[str] = []
    for field in fields:
        value = row.get(field)
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if item is not None and str(item).strip():
                out.append(str(item).strip())
    return out


def align_by_id(preds: RawSplit, refs: RawSplit, key: str, texts: list[str], ref_lists: list[list[str]]):
    for raw in (preds, refs):
        if key not in raw.columns:
            raise RecipeError(f"{raw.where}: no id column {key!r} (--id-field)")
    by_id: dict[str, list[str]] = {}
    for row, r in zip(refs.rows, ref_lists):  # repeated ids (a flattened split) pool their references
        by_id.setdefault(str(row[key]), []).extend(r)
    pred_ids = [str(row[key]) for row in preds.rows]
    missing = [i for i in by_id if i not in set(pred_ids)]
    if missing:
        raise RecipeError(f"{preds.where}: no prediction for {len(missing)} of {len(by_id)} ids in {refs.where} "
                          f"(first: {missing[0]!r})")
    unknown = [i for i in pred_ids if i not in by_id]
    if unknown:
        raise RecipeError(f"{preds.where}: id {unknown[0]!r} has no reference in {refs.where}")
    return texts, [by_id[i] for i in pred_ids]
