"""Faults on demand: damaged checkpoint files, a write the disk refuses, a kill in the middle of a save.

The damage helpers change one file the way storage goes wrong::

    truncate_file(path)   # an interrupted copy
    flip_a_bit(path)      # bit rot: same size, different content
    path.unlink()         # a lost file

The runner starts any ``tunesmith`` command with a fault armed at the N-th folder it writes
atomically (checkpoints and ``final/`` in the order they are written), after every file of it
is written and before its manifest, the moment a real fault does the most harm::

    python -m tunesmith.testing --fault kill --at-write 2 -- sft --model ... --save-steps 2
    torchrun --nproc-per-node 2 -m tunesmith.testing --fault enospc --at-write 2 -- sft ...

``kill`` ends the process with SIGKILL; ``enospc``, ``eio`` and ``erofs`` make the write fail
with that error, as a full, failing or read-only disk does. Under a launcher every process arms
the fault and the one that writes the manifest (rank 0) meets it.

:func:`small_filesystem_command` wraps a command so it runs with a size-limited tmpfs mounted
over a folder, in a private mount namespace (no root needed where the kernel allows
unprivileged user namespaces; :func:`small_filesystems_supported` says whether it does).
"""

from __future__ import annotations

import errno
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

FAULTS = {"kill": None, "enospc": errno.ENOSPC, "eio": errno.EIO, "erofs": errno.EROFS}


def truncate_file(path: Path, missing_bytes: int = 7) -> None:
    """Cut the last ``missing_bytes`` off ``path``."""
    path = Path(path)
    path.write_bytes(path.read_bytes()[:-missing_bytes])


def flip_a_bit(path: Path) -> None:
    """Flip one bit in the middle of ``path``; its size stays the same."""
    path = Path(path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def arm_fault(fault: str, at_write: int) -> None:
    """Make the ``at_write``-th atomic folder write of this process meet ``fault``."""
    import tunesmith.atomic as atomic

    real_write_manifest = atomic.write_manifest
    writes = 0

    def write_manifest(folder: Path) -> None:
        nonlocal writes
        writes += 1
        if writes == at_write:
            if fault == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            code = FAULTS[fault]
            raise OSError(code, os.strerror(code), str(folder / "manifest.json"))
        real_write_manifest(folder)

    atomic.write_manifest = write_manifest


def small_filesystems_supported() -> bool:
    """Whether :func:`small_filesystem_command` works here (``unshare`` and a user namespace allowed)."""
    if shutil.which("unshare") is None:
        return False
    with tempfile.TemporaryDirectory() as folder:
        probe = subprocess.run(small_filesystem_command(Path(folder), 1 << 20, "true"), capture_output=True)
    return probe.returncode == 0


def small_filesystem_command(mount_point: Path, size_bytes: int, script: str) -> list[str]:
    """A command that runs the shell ``script`` with a ``size_bytes`` tmpfs over ``mount_point``.

    The file system lives only as long as the script: copy out what the test inspects later.
    """
    mount = f"mount -t tmpfs -o size={size_bytes} tmpfs {shlex.quote(str(mount_point))}"
    return ["unshare", "--map-root-user", "--mount", "sh", "-c", f"{mount} && {script}"]
