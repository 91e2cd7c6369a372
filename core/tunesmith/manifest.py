"""``manifest.json``: what a complete folder holds, so damage is noticed before anything trusts it.

Every folder tunesmith writes atomically (checkpoints, ``final/``, exports) gets a manifest
as the last file written before it is renamed into place: each file's size and BLAKE2b hash,
plus the step and run identity when the folder is a checkpoint. :func:`verify_folder` compares
a folder with its manifest and names every file that is missing, truncated, changed or new.
A folder without a valid manifest is not complete.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

MANIFEST_FILE = "manifest.json"
STATE_FILE = "trainer_state.json"
CHUNK_BYTES = 8 * 1024 * 1024


def file_digest(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=32)
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def folder_files(folder: Path) -> list[Path]:
    """Every file below ``folder`` but the manifest, as relative paths in a stable order."""
    return sorted(path.relative_to(folder) for path in folder.rglob("*") if path.is_file() and path.name != MANIFEST_FILE)


def write_manifest(folder: Path) -> None:
    files = {str(relative): {"size": (folder / relative).stat().st_size, "blake2b": file_digest(folder / relative)} for relative in folder_files(folder)}
    manifest: dict = {"files": files}
    state_file = folder / STATE_FILE
    if state_file.is_file():
        state = json.loads(state_file.read_text(encoding="utf-8"))
        manifest.update(step=state.get("step"), run_identity=state.get("run_identity"))
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1), encoding="utf-8")


def verify_folder(folder: Path) -> list[str]:
    """What is wrong with ``folder``, one sentence per problem; empty when it matches its manifest."""
    path = folder / MANIFEST_FILE
    if not path.is_file():
        return [f"{MANIFEST_FILE} is missing, so the folder was never completely written"]
    try:
        files = json.loads(path.read_text(encoding="utf-8"))["files"]
    except (ValueError, KeyError, TypeError):
        return [f"{MANIFEST_FILE} is damaged (not the JSON tunesmith writes)"]
    problems = []
    for name, expected in files.items():
        actual = folder / name
        if not actual.is_file():
            problems.append(f"{name} is missing")
        elif actual.stat().st_size != expected["size"]:
            problems.append(f"{name} has {actual.stat().st_size} bytes, the manifest says {expected['size']} (truncated or overwritten)")
        elif file_digest(actual) != expected["blake2b"]:
            problems.append(f"{name} has the right size but different content (bit rot or an edit)")
    problems += [f"{relative} is not in the manifest" for relative in folder_files(folder) if str(relative) not in files]
    return problems
