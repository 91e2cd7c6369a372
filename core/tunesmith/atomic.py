"""Writing a folder so that it appears complete or not at all.

Everything is written into a staging folder beside the target, listed with sizes and hashes in
its ``manifest.json`` (:mod:`tunesmith.manifest`), flushed to disk, then renamed into place. A
crash at any point leaves the previous folder (or none) under the target's name; staging folders a killed process left behind are removed by
:func:`remove_staging_leftovers`. A write that fails is cleaned up at once.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

from tunesmith.errors import StorageError
from tunesmith.manifest import write_manifest
from tunesmith.storage import free_bytes, human_bytes, storage_failure

STAGING_PREFIX = ".staging-"


def write_atomically(target: Path, write_into: Callable[[Path], None]) -> None:
    """Call ``write_into(folder)`` on a staging folder, then rename it to ``target``.

    An existing ``target`` is replaced only once the new folder is complete. A write the
    storage refuses (full, read-only, failing) raises :class:`~tunesmith.errors.StorageError`
    once the staging folder is removed.
    """
    target = Path(target)
    staging = target.parent / f"{STAGING_PREFIX}{target.name}-{os.getpid()}"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir()
        write_into(staging)
        write_manifest(staging)
        _fsync_tree(staging)
        _move_into_place(staging, target)
    except BaseException as error:
        _give_up(error, staging, target)
        raise


def write_atomically_together(target: Path, write_into: Callable[[Path], None], leader: bool, barrier: Callable[[], None]) -> None:
    """Several processes write one folder atomically; every process calls this with the same ``target``.

    The ``leader`` prepares one staging folder, every process writes its files into it, and
    the leader renames it into place once all have finished. If any process dies first, the
    launcher stops the others and the previous ``target`` is untouched; the staging folder is
    removed by the process that failed or, after a kill, by the next run's
    :func:`remove_staging_leftovers`.
    """
    target = Path(target)
    staging = target.parent / f"{STAGING_PREFIX}{target.name}"
    try:
        if leader:
            target.parent.mkdir(parents=True, exist_ok=True)
            if staging.exists():
                shutil.rmtree(staging)
            staging.mkdir()
        barrier()
        write_into(staging)
        barrier()
        if leader:
            write_manifest(staging)
            _fsync_tree(staging)
            _move_into_place(staging, target)
        barrier()
    except BaseException as error:
        _give_up(error, staging, target)  # the other processes stop when the launcher sees this one fail
        raise


def _give_up(error: BaseException, staging: Path, target: Path) -> None:
    """Remove the staging folder; when the storage is to blame, say so as a :class:`StorageError`."""
    failure = storage_failure(error, staging.parent) if isinstance(error, Exception) else None
    shutil.rmtree(staging, ignore_errors=True)
    if failure is not None:
        kept = f"; {target} is unchanged" if target.exists() else ""
        raise StorageError(
            f"could not write {target}: {failure} ({human_bytes(free_bytes(target.parent))} free there now). "
            f"The partly written folder was removed{kept}"
        ) from error


def _move_into_place(staging: Path, target: Path) -> None:
    if target.exists():
        retired = target.parent / f"{STAGING_PREFIX}retired-{target.name}-{os.getpid()}"
        os.rename(target, retired)
        os.rename(staging, target)
        shutil.rmtree(retired)
    else:
        os.rename(staging, target)
    _fsync_dir(target.parent)


def remove_staging_leftovers(folder: Path) -> list[Path]:
    """Delete staging folders a killed process left in ``folder``; return what was removed."""
    removed = []
    if folder.is_dir():
        for path in folder.iterdir():
            if path.name.startswith(STAGING_PREFIX) and path.is_dir():
                shutil.rmtree(path)
                removed.append(path)
    return removed


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
