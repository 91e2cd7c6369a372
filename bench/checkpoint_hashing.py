"""What a tunesmith checkpoint manifest costs next to the plain save our peers do.

Both sides write the same training state, built in memory with nothing downloaded: a
transformers ``LlamaForCausalLM`` the size of SmolLM2-135M with random fp32 weights, plus the
AdamW state after one step (full fine-tuning, the worst case: weights and two fp32 moments,
about 1.6 GB). ``--scale N`` multiplies the layers by N for multi-GB checkpoints.

(a) plain  - what Hugging Face Trainer / TRL do: ``save_pretrained`` (safetensors) and
             ``torch.save(optimizer.state_dict())`` into a folder. No hash, no fsync: the OS
             writes the dirty pages back later, while training goes on.
(b) atomic - tunesmith's ``write_atomically(target, same write)``: the same files into a staging
             folder, then ``manifest.json`` (size and BLAKE2b of every file), fsync, rename.
             Its time is split into the write, the manifest (the hashing) and fsync + rename.
(c) verify - ``verify_folder`` on the folder (b) wrote, which is what a resume pays before it
             trusts a checkpoint: once with the files still in the page cache (a resume in the
             same boot, soon after) and once after evicting them from it (a cold resume; on a
             virtual machine the host may still cache the disk, so this is a lower bound).

(a) and (b) alternate in one invocation, the order flipped every repetition, and each starts
on a synced disk with the previous folder deleted. The medians are printed.

Run from the repository root with the repository installed (``make install``):

    .venv/bin/python bench/checkpoint_hashing.py --dir /tmp/bench
    .venv/bin/python bench/checkpoint_hashing.py --dir /tmp/bench --scale 4 --repeat 3
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

import tunesmith.atomic
from tunesmith.atomic import write_atomically
from tunesmith.manifest import verify_folder

MB = 1_000_000


def smollm2_135m_config(scale: int) -> LlamaConfig:
    """SmolLM2-135M's shape; ``scale`` multiplies its 30 layers."""
    return LlamaConfig(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30 * scale,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
    )


def build_training_state(scale: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A random-weight model and an AdamW optimizer that has taken one step (so both moments exist)."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(smollm2_135m_config(scale))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    for parameter in model.parameters():
        parameter.grad = torch.randn_like(parameter) * 1e-3
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return model, optimizer


def save_plain(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """The peer checkpoint: weights as safetensors, optimizer state with ``torch.save``, the step."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    torch.save(optimizer.state_dict(), folder / "optimizer.pt")
    (folder / "trainer_state.json").write_text(json.dumps({"step": 1}), encoding="utf-8")


def folder_bytes(folder: Path) -> dict[str, int]:
    return {str(path.relative_to(folder)): path.stat().st_size for path in sorted(folder.rglob("*")) if path.is_file()}


def start_clean(folder: Path) -> None:
    """Delete ``folder`` and flush the disk, so no write-back of an earlier run is timed."""
    shutil.rmtree(folder, ignore_errors=True)
    os.sync()


@contextlib.contextmanager
def manifest_timer(seconds: list[float]) -> Iterator[None]:
    """Append the time spent in ``write_manifest`` during the block to ``seconds``."""
    original = tunesmith.atomic.write_manifest

    def timed(folder: Path) -> None:
        started = time.perf_counter()
        original(folder)
        seconds.append(time.perf_counter() - started)

    tunesmith.atomic.write_manifest = timed
    try:
        yield
    finally:
        tunesmith.atomic.write_manifest = original


def time_plain(folder: Path, write: Callable[[Path], None]) -> float:
    start_clean(folder)
    started = time.perf_counter()
    write(folder)
    return time.perf_counter() - started


def time_atomic(folder: Path, write: Callable[[Path], None]) -> dict[str, float]:
    """Total seconds of ``write_atomically`` and its parts: write, manifest, fsync + rename."""
    start_clean(folder)
    write_seconds: list[float] = []
    manifest_seconds: list[float] = []

    def timed_write(staging: Path) -> None:
        started = time.perf_counter()
        write(staging)
        write_seconds.append(time.perf_counter() - started)

    with manifest_timer(manifest_seconds):
        started = time.perf_counter()
        write_atomically(folder, timed_write)
        total = time.perf_counter() - started
    return {
        "total": total,
        "write": write_seconds[0],
        "manifest": manifest_seconds[0],
        "fsync_rename": total - write_seconds[0] - manifest_seconds[0],
    }


def evict_from_page_cache(folder: Path) -> None:
    """Drop the (already fsynced, so clean) pages of every file from the page cache."""
    for path in folder.rglob("*"):
        if path.is_file():
            descriptor = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(descriptor)


def time_verify(folder: Path, cold: bool) -> float:
    if cold:
        evict_from_page_cache(folder)
    started = time.perf_counter()
    problems = verify_folder(folder)
    seconds = time.perf_counter() - started
    if problems:
        raise RuntimeError(f"the folder just written does not verify: {problems}")
    return seconds


def run(base: Path, scale: int, repeat: int) -> tuple[dict[str, int], dict[str, list[float]]]:
    """Alternate (a) and (b) ``repeat`` times, each (b) followed by (c); every time in seconds."""
    model, optimizer = build_training_state(scale)

    def write(folder: Path) -> None:
        save_plain(folder, model, optimizer)

    plain_folder, atomic_folder = base / "plain" / "checkpoint-1", base / "atomic" / "checkpoint-1"
    time_plain(plain_folder, write)  # warm-up, not counted: the first save pays one-off allocations
    start_clean(plain_folder)
    times: dict[str, list[float]] = {key: [] for key in ("plain", "total", "write", "manifest", "fsync_rename", "warm", "cold")}
    sizes: dict[str, int] = {}
    for repetition in range(repeat):
        plain_first = repetition % 2 == 0
        for side in ("plain", "atomic") if plain_first else ("atomic", "plain"):
            if side == "plain":
                times["plain"].append(time_plain(plain_folder, write))
                start_clean(plain_folder)
            else:
                for key, seconds in time_atomic(atomic_folder, write).items():
                    times[key].append(seconds)
                sizes = folder_bytes(atomic_folder)
                times["warm"].append(time_verify(atomic_folder, cold=False))
                times["cold"].append(time_verify(atomic_folder, cold=True))
                start_clean(atomic_folder)
        print(
            f"repetition {repetition + 1}/{repeat}: " + ", ".join(f"{key} {values[-1]:.2f}s" for key, values in times.items()),
            flush=True,
        )
    return sizes, times


def table(sizes: dict[str, int], times: dict[str, list[float]]) -> str:
    """The medians as a Markdown table: seconds, hashing throughput, and the extra time in % of the plain save."""
    hashed = sum(size for name, size in sizes.items() if name != "manifest.json")
    median = {key: statistics.median(values) for key, values in times.items()}
    median["extra"] = median["total"] - median["plain"]
    plain = median["plain"]

    def row(label: str, key: str, throughput: bool = False, extra: bool = True) -> str:
        spread = f"{min(times[key]):.2f}-{max(times[key]):.2f}" if key in times else ""
        rate = f"{hashed / MB / median[key]:,.0f}" if throughput else ""
        share = f"{100 * median[key] / plain:+.0f}%" if extra else ""
        return f"| {label} | {median[key]:.2f} | {spread} | {rate} | {share} |"

    files = ", ".join(f"{name} {size / MB:,.1f} MB" for name, size in sizes.items() if size >= MB)
    return "\n".join(
        [
            f"checkpoint: {hashed / MB:,.0f} MB hashed in {len(sizes) - 1} files ({files}); {len(times['plain'])} runs each",
            "",
            "| step | median s | min-max s | hashing MB/s | extra, in % of (a) |",
            "|---|---:|---:|---:|---:|",
            row("(a) plain save (save_pretrained + torch.save)", "plain", extra=False),
            row("(b) write_atomically, same write", "total", extra=False),
            row("&nbsp;&nbsp;of which the write", "write", extra=False),
            row("&nbsp;&nbsp;of which manifest.json (hashing)", "manifest", throughput=True),
            row("&nbsp;&nbsp;of which fsync + rename", "fsync_rename"),
            row("(b) - (a): what tunesmith adds", "extra"),
            row("(c) verify_folder, files in page cache", "warm", throughput=True),
            row("(c) verify_folder, files evicted from cache", "cold", throughput=True),
            "",
            f"hashing is {100 * median['manifest'] / median['total']:.0f}% of write_atomically's time;"
            f" write_atomically takes {median['total'] / plain:.1f}x the plain save.",
        ]
    )


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=None, help="folder to write checkpoints under (default: a new temp dir)")
    parser.add_argument("--scale", type=int, default=1, help="multiply SmolLM2-135M's 30 layers by this (default 1)")
    parser.add_argument("--repeat", type=int, default=3, help="repetitions of each measurement (default 3)")
    return parser.parse_args()


def main() -> None:
    arguments = parse_arguments()
    transformers.utils.logging.disable_progress_bar()
    print(f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}")
    if arguments.dir is not None:
        arguments.dir.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="checkpoint-hashing-", dir=arguments.dir))
    try:
        sizes, times = run(base, arguments.scale, arguments.repeat)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print()
    print(table(sizes, times))


if __name__ == "__main__":
    main()
