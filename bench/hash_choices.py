"""Which hashlib way of hashing a checkpoint is cheapest while still catching damage.

Writes the same checkpoint as ``checkpoint_hashing.py`` (SmolLM2-135M-sized Llama with AdamW
state, about 1.6 GB; ``--scale`` for more) once, then hashes all of its files with each way
below, round-robin for ``--repeat`` rounds, and prints the median seconds and MB/s:

- what ``tunesmith.manifest.file_digest`` does today (BLAKE2b-256, ``read()`` of 8 MiB chunks);
- the same BLAKE2b-256 with ``readinto`` a reusable buffer (8 MiB, 64 MiB) or ``hashlib.file_digest``;
  these give the very same digests, so a manifest written one way verifies the other way;
- SHA-256, SHA-1 and MD5 with ``readinto`` (other digests: a format change);
- BLAKE2b or SHA-256 with the files hashed in parallel threads (hashlib releases the GIL);
- BLAKE2b of 64 MiB pieces hashed in parallel threads, then the digest of the piece digests
  (one big file no longer bounds the time by one core).

"warm" hashes files still in the page cache, as ``write_manifest`` does right after the
write; "cold" first evicts them, as a resume after a reboot would.

Run from the repository root with the repository installed (``make install``):

    .venv/bin/python bench/hash_choices.py --dir /tmp/bench
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import transformers
from checkpoint_hashing import MB, build_training_state, evict_from_page_cache, save_plain

from tunesmith.manifest import file_digest

PIECE_BYTES = 64 * 1024 * 1024
THREADS = os.cpu_count() or 1


def readinto_digest(algorithm: str, buffer_bytes: int = 8 * 1024 * 1024) -> Callable[[Path], str]:
    """Hash a file by reading it into one reusable buffer (no new bytes object per chunk)."""

    def digest(path: Path) -> str:
        hasher = hashlib.blake2b(digest_size=32) if algorithm == "blake2b" else hashlib.new(algorithm)
        buffer = bytearray(buffer_bytes)
        view = memoryview(buffer)
        with open(path, "rb", buffering=0) as handle:
            while count := handle.readinto(buffer):
                hasher.update(view[:count])
        return hasher.hexdigest()

    return digest


def stdlib_file_digest(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, lambda: hashlib.blake2b(digest_size=32)).hexdigest()


def piece_digest(path: Path, offset: int) -> bytes:
    with open(path, "rb", buffering=0) as handle:
        handle.seek(offset)
        return hashlib.blake2b(handle.read(PIECE_BYTES), digest_size=32).digest()


def pieces_in_threads(path: Path) -> str:
    """BLAKE2b of the file's size and of the BLAKE2b of each 64 MiB piece, the pieces hashed in threads."""
    size = path.stat().st_size
    with ThreadPoolExecutor(THREADS) as pool:
        pieces = list(pool.map(lambda offset: piece_digest(path, offset), range(0, size, PIECE_BYTES)))
    return hashlib.blake2b(size.to_bytes(8, "little") + b"".join(pieces), digest_size=32).hexdigest()


def files_in_threads(digest: Callable[[Path], str]) -> Callable[[list[Path]], list[str]]:
    def hash_all(paths: list[Path]) -> list[str]:
        with ThreadPoolExecutor(THREADS) as pool:
            return list(pool.map(digest, paths))

    return hash_all


def one_by_one(digest: Callable[[Path], str]) -> Callable[[list[Path]], list[str]]:
    def hash_all(paths: list[Path]) -> list[str]:
        return [digest(path) for path in paths]

    return hash_all


WAYS: dict[str, Callable[[list[Path]], list[str]]] = {
    "blake2b read() 8 MiB (today's file_digest)": one_by_one(file_digest),
    "blake2b readinto 8 MiB": one_by_one(readinto_digest("blake2b")),
    "blake2b readinto 64 MiB": one_by_one(readinto_digest("blake2b", 64 * 1024 * 1024)),
    "blake2b hashlib.file_digest": one_by_one(stdlib_file_digest),
    "sha256 readinto 8 MiB": one_by_one(readinto_digest("sha256")),
    "sha1 readinto 8 MiB": one_by_one(readinto_digest("sha1")),
    "md5 readinto 8 MiB": one_by_one(readinto_digest("md5")),
    f"blake2b readinto 8 MiB, files in {THREADS} threads": files_in_threads(readinto_digest("blake2b")),
    f"sha256 readinto 8 MiB, files in {THREADS} threads": files_in_threads(readinto_digest("sha256")),
    f"blake2b of 64 MiB pieces in {THREADS} threads": one_by_one(pieces_in_threads),
}
SAME_AS_TODAY = ("blake2b readinto 8 MiB", "blake2b readinto 64 MiB", "blake2b hashlib.file_digest")


def time_way(hash_all: Callable[[list[Path]], list[str]], folder: Path, paths: list[Path], cold: bool) -> tuple[float, list[str]]:
    if cold:
        evict_from_page_cache(folder)
    started = time.perf_counter()
    digests = hash_all(paths)
    return time.perf_counter() - started, digests


def measure(folder: Path, repeat: int) -> dict[tuple[str, str], list[float]]:
    """Seconds to hash every file of ``folder`` per (way, warm/cold), the ways taken round-robin."""
    paths = sorted(path for path in folder.rglob("*") if path.is_file())
    today = one_by_one(file_digest)(paths)
    times: dict[tuple[str, str], list[float]] = {(name, cache): [] for name in WAYS for cache in ("warm", "cold")}
    for _ in range(repeat):
        for name, hash_all in WAYS.items():
            for cache in ("warm", "cold"):
                seconds, digests = time_way(hash_all, folder, paths, cold=cache == "cold")
                if name in SAME_AS_TODAY and digests != today:
                    raise RuntimeError(f"{name} does not give today's digests")
                times[(name, cache)].append(seconds)
    return times


def table(total_bytes: int, times: dict[tuple[str, str], list[float]]) -> str:
    lines = [
        f"{total_bytes / MB:,.0f} MB hashed; medians of {len(next(iter(times.values())))} rounds",
        "",
        "| way | warm s | warm MB/s | cold s | cold MB/s |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in WAYS:
        warm, cold = statistics.median(times[(name, "warm")]), statistics.median(times[(name, "cold")])
        lines.append(f"| {name} | {warm:.2f} | {total_bytes / MB / warm:,.0f} | {cold:.2f} | {total_bytes / MB / cold:,.0f} |")
    return "\n".join(lines)


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=None, help="folder to write the checkpoint under (default: a new temp dir)")
    parser.add_argument("--scale", type=int, default=1, help="multiply SmolLM2-135M's 30 layers by this (default 1)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds over all the ways (default 3)")
    return parser.parse_args()


def main() -> None:
    arguments = parse_arguments()
    transformers.utils.logging.disable_progress_bar()
    if arguments.dir is not None:
        arguments.dir.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="hash-choices-", dir=arguments.dir))
    try:
        model, optimizer = build_training_state(arguments.scale)
        folder = base / "checkpoint-1"
        save_plain(folder, model, optimizer)
        del model, optimizer
        os.sync()
        total_bytes = sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())
        times = measure(folder, arguments.repeat)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(table(total_bytes, times))


if __name__ == "__main__":
    main()
