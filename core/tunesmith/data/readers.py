"""Reading dataset files into raw records, one ``(number, dict)`` per row.

Supported: JSON Lines (``.jsonl``), a JSON list of objects (``.json``, or JSON Lines under that
name), CSV with a header row (``.csv``), Parquet (``.parquet``) and a folder written by
``datasets.Dataset.save_to_disk``.
The number locating a row is its 1-based *line* in ``.jsonl`` and ``.csv`` files (blank lines
and the CSV header count, so an editor jumps straight to it) and its 1-based *row* in the other
formats. Errors put it after the file name, ``data.jsonl:7: ...``, as ``Example.where`` does.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tunesmith.errors import DataError

SUPPORTED_FORMATS = ".jsonl, .json, .csv, .parquet, or a folder written by datasets.Dataset.save_to_disk"


class BadRowError(DataError):
    """One row is malformed; ``--skip-bad-rows`` skips and counts these instead of stopping."""


OnBadRow = Callable[[BadRowError], None]


def read_records(path: str | Path, on_bad_row: OnBadRow | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(number, record)`` for each row of ``path``.

    A malformed row raises :class:`BadRowError`, or, when ``on_bad_row`` is given, is passed to
    it and reading goes on with the next row. Problems with the whole file (missing, unknown
    format, unreadable) always raise :class:`DataError`.
    """
    path = Path(path)
    if path.is_dir():
        rows = _read_saved_dataset(path)
    elif not path.is_file():
        raise DataError(f"{path}: no such file or folder; supported formats: {SUPPORTED_FORMATS}")
    else:
        reader = _READERS.get(path.suffix.lower())
        if reader is None:
            kind = path.suffix or "(no extension)"
            raise DataError(f"{path}: unsupported file type {kind!r}; supported formats: {SUPPORTED_FORMATS}")
        rows = reader(path)
    for number, record in rows:
        if not isinstance(record, (dict, BadRowError)):
            record = BadRowError(f"{path}:{number}: expected an object (field names to values), got {json_type(record)}")
        if isinstance(record, BadRowError):
            if on_bad_row is None:
                raise record
            on_bad_row(record)
        else:
            yield number, record


def json_type(value: Any) -> str:
    """The JSON name of ``value``'s type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _json_problem(error: json.JSONDecodeError, text: str) -> str:
    """What is wrong and where, for a message after ``path:line: ``; ``text`` names what was
    parsed ("line" or "file"), e.g. "invalid JSON: expecting value at the end of the line"."""
    # Two of json's messages ("Invalid control character at", "Unterminated string starting at")
    # already end in the "at" that comes before the position.
    what = error.msg.removesuffix(" at")
    where = f"at the end of the {text}" if error.pos == len(error.doc) else f"at column {error.colno}"
    if what.startswith("Invalid control character"):
        character = error.doc[error.pos]
        escaped = json.dumps(character)[1:-1]
        return f"invalid JSON: control character {character!r} {where}; inside a string write it escaped, as {escaped}"
    return f"invalid JSON: {what[0].lower()}{what[1:]} {where}"


# The private readers yield a BadRowError in place of a record so that read_records, not each
# format, decides whether a bad row stops reading.


def _read_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    # Bytes, so that one line of invalid UTF-8 is one bad row rather than the end of the file.
    with path.open("rb") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                # Without its line ending, so positions are within the line as an editor shows it.
                yield number, json.loads(line.rstrip(b"\r\n"))
            except json.JSONDecodeError as error:
                yield number, BadRowError(f"{path}:{number}: {_json_problem(error, 'line')}")
            except UnicodeDecodeError as error:
                yield number, BadRowError(f"{path}:{number}: not UTF-8 text ({error})")


def _read_json(path: Path) -> Iterator[tuple[int, Any]]:
    text = _read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        # Many published ".json" datasets are really JSON Lines: one object per line.
        if text.lstrip().startswith("{"):
            yield from _read_jsonl(path)
            return
        raise DataError(f"{path}:{error.lineno}: {_json_problem(error, 'file')}; expected a list of objects") from None
    if isinstance(data, dict):
        yield 1, data
    elif isinstance(data, list):
        yield from enumerate(data, start=1)
    else:
        raise DataError(f"{path}: expected a top-level list of objects, got {json_type(data)}")


def _read_csv(path: Path) -> Iterator[tuple[int, Any]]:
    text = _read_text(path)
    reader = csv.reader(text.splitlines(keepends=True))
    header = next(reader, None)
    if header is None:
        return
    if len(set(header)) != len(header):
        raise DataError(f"{path}:1: the header row names a column twice: {', '.join(header)}")
    start = reader.line_num + 1
    for fields in reader:
        if fields:
            if len(fields) != len(header):
                problem = f"expected {len(header)} fields as in the header row, found {len(fields)}"
                yield start, BadRowError(f"{path}:{start}: {problem}")
            else:
                yield start, dict(zip(header, fields))
        start = reader.line_num + 1


def _read_parquet(path: Path) -> Iterator[tuple[int, Any]]:
    import pyarrow
    import pyarrow.parquet

    try:
        batches = pyarrow.parquet.ParquetFile(path).iter_batches()
        number = 0
        for batch in batches:
            for record in batch.to_pylist():
                number += 1
                yield number, record
    except pyarrow.ArrowException as error:
        raise DataError(f"{path}: not a readable Parquet file ({error})") from None


def _read_saved_dataset(path: Path) -> Iterator[tuple[int, Any]]:
    import datasets

    try:
        dataset = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise DataError(
            f"{path}: a folder, but not one written by datasets.Dataset.save_to_disk; supported formats: {SUPPORTED_FORMATS}"
        ) from None
    if isinstance(dataset, datasets.DatasetDict):
        if "train" not in dataset:
            raise DataError(f"{path}: the saved DatasetDict has no 'train' split (it has: {', '.join(dataset)})")
        dataset = dataset["train"]
    yield from enumerate(dataset, start=1)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text ({error})") from None


_READERS: dict[str, Callable[[Path], Iterator[tuple[int, Any]]]] = {
    ".jsonl": _read_jsonl,
    ".json": _read_json,
    ".csv": _read_csv,
    ".parquet": _read_parquet,
}
