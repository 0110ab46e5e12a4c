"""Raw rows of one split, read from a local split file (jsonl, csv, parquet) or the Hugging Face Hub."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dsum.config import RecipeError

SPLIT_FORMATS = (".jsonl", ".csv", ".parquet")


@dataclass
class RawSplit:
    """Rows as read, before any field mapping; `where` names the file or Hub split for messages."""

    rows: list[dict[str, Any]]
    columns: list[str]
    where: str


def split_file(directory: Path, split: str) -> Path:
    """The one file `<directory>/<split>.{jsonl,csv,parquet}`; none or several is an error."""
    found = [directory / f"{split}{suffix}" for suffix in SPLIT_FORMATS if (directory / f"{split}{suffix}").is_file()]
    if len(found) > 1:
        names = ", ".join(path.name for path in found)
        raise RecipeError(f"split {split!r} in {directory}: several files ({names}); keep exactly one")
    if not found:
        present = sorted(path.name for path in directory.iterdir() if path.suffix in SPLIT_FORMATS)
        expected = ", ".join(f"{split}{suffix}" for suffix in SPLIT_FORMATS)
        raise RecipeError(
            f"split {split!r} in {directory}: no split file (expected one of {expected}; "
            f"split files present: {', '.join(present) or 'none'})"
        )
    return found[0]


def read_local_split(directory: Path, split: str) -> RawSplit:
    return read_table(split_file(directory, split))


def read_table(path: Path) -> RawSplit:
    """Rows of one .jsonl, .csv or .parquet file."""
    readers = {".jsonl": _read_jsonl, ".csv": _read_csv, ".parquet": _read_parquet}
    if path.suffix not in readers:
        raise RecipeError(f"{path}: expected a .jsonl, .csv or .parquet file")
    if not path.is_file():
        raise RecipeError(f"{path}: no such file")
    rows, columns = readers[path.suffix](path)
    return RawSplit(rows, columns, where=str(path))


def read_hub_split(source: str, split: str) -> RawSplit:
    """`datasets.load_dataset(source, split=split)`; any failure (offline, unknown id or split) is a RecipeError."""
    try:
        import datasets

        dataset = datasets.load_dataset(source, split=split)
    except Exception as err:  # noqa: BLE001 - datasets raises many unrelated types; all mean "not loadable"
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RecipeError(
            f"data.source {source!r}: could not load split {split!r} from the Hugging Face Hub ({reason}); "
            f"data.source can instead be a local directory of split files or 'synthetic'"
        ) from None
    return RawSplit(dataset.to_list(), list(dataset.column_names), where=f"Hub dataset {source!r} split {split!r}")


def decode(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise RecipeError(f"{path}: not UTF-8 text (invalid byte at offset {err.start})") from None


def text_lines(text: str) -> list[str]:
    """A text file's lines: split at "\n" alone ("\r\n" too), as files and JSON Lines define them, never at
    the other breaks `str.splitlines()` knows (U+2028 inside a JSON string, a form feed in a dialogue)."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def json_line(line: str) -> Any:
    """One line of JSON Lines, strictly: NaN and Infinity are not JSON (Python's reader takes them)."""
    def refuse(constant: str):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(line, parse_constant=refuse)


def _columns_of(rows: list[dict[str, Any]]) -> list[str]:
    """Every key of every row, in order of first appearance."""
    return list(dict.fromkeys(key for row in rows for key in row))


def _read_jsonl(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    rows = []
    for number, line in enumerate(text_lines(decode(path)), start=1):
        if not line.strip():
            continue
        try:
            row = json_line(line)
        except json.JSONDecodeError as err:
            raise RecipeError(f"{path}, line {number}: not valid JSON ({err.msg})") from None
        except ValueError as err:
            raise RecipeError(f"{path}, line {number}: not valid JSON ({err})") from None
        if not isinstance(row, dict):
            raise RecipeError(f"{path}, line {number}: expected a JSON object, found a {type(row).__name__}")
        rows.append(row)
    return rows, _columns_of(rows)


def _read_csv(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    reader = csv.reader(io.StringIO(decode(path), newline=""))
    header: list[str] | None = None
    rows = []
    try:
        for record in reader:
            if not record:  # a blank line
                continue
            if header is None:
                header = record
                continue
            if len(record) != len(header):
                raise RecipeError(
                    f"{path}, line {reader.line_num}: {len(record)} fields but the header has {len(header)}"
                )
            rows.append(dict(zip(header, record)))
    except csv.Error as err:
        raise RecipeError(f"{path}, line {reader.line_num}: malformed CSV ({err})") from None
    return rows, header or []


def _read_parquet(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as err:
        raise RecipeError(f"{path}: not a readable Parquet file ({err})") from None
    return table.to_pylist(), list(table.column_names)
