"""Fingerprints of dataset files, so that a run never resumes on data changed under the same path.

A checkpoint remembers where in the data's order it stopped, as row numbers; rows that moved,
appeared or vanished would make a resumed run train on other rows than the one it continues.
So the run identity (:mod:`tunesmith.resume`) holds each ``--dataset`` and ``--eval-dataset``
path's fingerprint: its size in bytes and a BLAKE2b hash. A file up to ``WHOLE_FILE_BYTES`` is
hashed whole (BLAKE2b reads about 600 MiB/s on one core); a larger one is hashed by its size,
its first and last ``EDGE_BYTES`` and ``SAMPLED_BLOCKS`` blocks spread evenly between, so a
dataset of many gigabytes costs a fraction of a second on every start. An edit to a large file
that keeps its size and touches no sampled byte goes unnoticed; appending, truncating,
re-exporting or reordering rows does not. A folder's fingerprint covers every file below it,
with their relative paths.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from tunesmith.data.loading import parse_spec

MIB = 1024 * 1024
WHOLE_FILE_BYTES = 64 * MIB
EDGE_BYTES = 8 * MIB
SAMPLED_BLOCKS = 32
BLOCK_BYTES = MIB
#: the options whose files are fingerprinted
DATA_OPTIONS = ("dataset", "eval_dataset")


def data_fingerprints(config) -> dict[str, dict[str, dict]]:
    """``{option: {path: fingerprint}}`` for the local files and folders of ``config``'s data options."""
    found: dict[str, dict[str, dict]] = {}
    for option in DATA_OPTIONS:
        for spec in getattr(config, option):
            path = parse_spec(spec).path
            fingerprint = path_fingerprint(Path(path))
            if fingerprint is not None:
                found.setdefault(option, {})[path] = fingerprint
    return found


def path_fingerprint(path: Path) -> dict | None:
    """``{"bytes": size, "blake2b": hex}`` of a file, or of every file below a folder; None when neither exists."""
    if path.is_file():
        return {"bytes": path.stat().st_size, "blake2b": _file_digest(path).hexdigest()}
    if not path.is_dir():
        return None
    digest, size = hashlib.blake2b(digest_size=16), 0
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        size += file.stat().st_size
        digest.update(file.relative_to(path).as_posix().encode() + b"\0" + _file_digest(file).digest())
    return {"bytes": size, "blake2b": digest.hexdigest()}


def _file_digest(path: Path):
    size = path.stat().st_size
    digest = hashlib.blake2b(digest_size=16)
    digest.update(size.to_bytes(8, "little"))
    with open(path, "rb") as handle:
        if size <= WHOLE_FILE_BYTES:
            while chunk := handle.read(8 * MIB):
                digest.update(chunk)
            return digest
        stride = (size - 2 * EDGE_BYTES) // (SAMPLED_BLOCKS + 1)
        pieces = [(0, EDGE_BYTES)]
        pieces += [(EDGE_BYTES + stride * (index + 1), BLOCK_BYTES) for index in range(SAMPLED_BLOCKS)]
        pieces.append((size - EDGE_BYTES, EDGE_BYTES))
        for offset, length in pieces:
            handle.seek(offset)
            digest.update(handle.read(length))
    return digest
