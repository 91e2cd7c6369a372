"""Disk space and failed writes, told in the user's terms.

Before a checkpoint is written, :func:`checkpoint_shortage` compares the space it needs (the
size of the previous checkpoint, or an estimate from the model and optimizer state before the
first) with what is free. A write that fails anyway is recognised by :func:`storage_failure`,
whether the writer raised an ``OSError`` or its own error (``torch.save`` reports a full disk as
``RuntimeError: [enforce fail at inline_container.cc] unexpected pos``), by looking at the
error's causes and then at the file system itself.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

#: what each ``OSError`` a full, failing or locked volume raises means to a user
WRITE_FAILURES = {
    errno.ENOSPC: "no space is left on the device",
    errno.EDQUOT: "the disk quota is used up",
    errno.EFBIG: "a file grew past the size this system allows",
    errno.EROFS: "the file system is read-only",
    errno.EIO: "the device reported an input/output error (a failing disk or a lost network volume)",
    errno.EACCES: "permission to write there is denied",
    errno.EPERM: "permission to write there is denied",
}
#: below this much free space a failed write is taken for a full disk, whatever the writer said
NEARLY_FULL_BYTES = 1 << 20


def human_bytes(size: float) -> str:
    if size < 1000:
        return f"{size:.0f} bytes"
    for unit in ("KB", "MB", "GB"):
        size /= 1000
        if size < 1000:
            return f"{size:.1f} {unit}"
    return f"{size / 1000:.1f} TB"


def existing_parent(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists (the folder whose file system will be written)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(existing_parent(path)).free


def storage_failure(error: BaseException, folder: Path) -> str | None:
    """Why writing into ``folder`` failed when the storage is to blame, in words; None when it is not."""
    seen = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in WRITE_FAILURES:
            return WRITE_FAILURES[seen.errno]
        seen = seen.__cause__ or seen.__context__
    where = existing_parent(folder)
    if os.statvfs(where).f_flag & os.ST_RDONLY:
        return WRITE_FAILURES[errno.EROFS]
    if shutil.disk_usage(where).free < NEARLY_FULL_BYTES:
        return WRITE_FAILURES[errno.ENOSPC]
    return None


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def state_bytes(model, optimizer) -> int:
    """What the trainable weights and the optimizer state take when saved (whole, over all processes)."""
    import torch

    total = sum(_whole_bytes(parameter) for parameter in model.parameters() if parameter.requires_grad)
    for values in getattr(optimizer, "state", {}).values():
        total += sum(_whole_bytes(value) for value in values.values() if isinstance(value, torch.Tensor))
    return total


def _whole_bytes(tensor) -> int:
    # A DTensor's numel is the whole tensor's; a ZeRO-3 partition keeps the whole count in ds_numel.
    return getattr(tensor, "ds_numel", tensor.numel()) * tensor.element_size()


def checkpoint_shortage(folder: Path, previous: Path | None, model, optimizer) -> str | None:
    """Why ``folder`` will not fit on its disk, or None when it will."""
    if previous is not None:
        needed, basis = folder_bytes(previous), f"as much as {previous.name}"
    else:
        needed, basis = state_bytes(model, optimizer), "estimated from the model and optimizer state"
    free = free_bytes(folder)
    if needed <= free:
        return None
    return (
        f"not enough disk space to write {folder}: it needs about {human_bytes(needed)} ({basis}) and "
        f"{existing_parent(folder.parent)} has {human_bytes(free)} free; stopped before writing"
    )
