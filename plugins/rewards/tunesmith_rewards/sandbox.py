"""Run untrusted Python, such as a model's answer to a coding task, in a sandbox.

:func:`run_python` runs a program under ``unshare`` in fresh user, network, pid, mount, IPC and
UTS namespaces (see :mod:`tunesmith_rewards.sandbox_init` for what the sandbox's first process
sets up), so that the program

- has no network: its network namespace holds only a loopback interface, which is down;
- sees no file it could change outside its own working directory, a tmpfs ``/tmp`` of at most
  ``disk_mb``: every other mount is read-only, and ``/tmp``, ``/run``, the home directories and
  ``/dev`` are swapped for nearly empty ones;
- sees no secret of the trainer's: it starts with a minimal environment, and its ``/proc`` shows
  only the sandbox's own processes;
- runs under limits on address space, CPU time, file size, open files and processes, and is
  killed, with every process it started, ``setsid`` daemons included, at the wall-clock timeout;
- has its output capped while it is read, so a flood of output costs no memory.

This needs the ``unshare`` tool (util-linux) and a kernel that lets this user make user
namespaces; :func:`sandbox_available` tries it once and says why not. Without it
:func:`run_python` refuses, unless ``TUNESMITH_SANDBOX=unisolated`` is set: then the program
still runs in a fresh directory, its own session, a minimal environment and under the resource
limits but the process cap (outside a user namespace ``RLIMIT_NPROC`` counts all the user's
processes), but that is not isolation: it can read and write the user's files, use the network,
start any number of processes and leave them behind.
"""

from __future__ import annotations

import json
import logging
import math
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path

#: the environment variable that allows running without isolation where the sandbox is unavailable
UNISOLATED_ENV = "TUNESMITH_SANDBOX"
UNISOLATED_VALUE = "unisolated"

NAMESPACES = ["--user", "--map-root-user", "--net", "--pid", "--fork", "--mount-proc", "--ipc", "--uts"]
# the whole environment a sandboxed program starts with, besides HOME and TMPDIR (its directory)
ENVIRONMENT = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
# the first process's own environment: one malloc arena, as each of its threads holding a pid would
# otherwise reserve one of 64 MiB under its address-space limit
INIT_ENVIRONMENT = dict(ENVIRONMENT, MALLOC_ARENA_MAX="1")
INIT_SOURCE = (Path(__file__).with_name("sandbox_init.py")).read_text()
# how long to wait for a killed sandbox to be reaped before giving up on it
REAP_SECONDS = 5.0
READ_SIZE = 65536
# how long to keep reading output after the sandbox's first process exits: in unisolated mode a
# process left behind may hold the pipes open for ever
LINGER_SECONDS = 0.5

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SandboxResult:
    """How a sandboxed run ended.

    ``returncode`` is the program's exit status, negative for the signal that killed it, and
    ``None`` when it did not finish (timed out, or the sandbox failed). ``stdout`` and ``stderr``
    hold at most ``max_output`` bytes each, decoded as UTF-8; ``truncated`` says one was cut.
    ``infrastructure_error`` says why the sandbox itself could not run the program; the other
    fields then say nothing about the program.
    """

    returncode: int | None
    stdout: str
    stderr: str
    truncated: bool
    timed_out: bool
    seconds: float
    infrastructure_error: str | None = None


@cache
def sandbox_available() -> str | None:
    """``None`` when :func:`run_python` can isolate a program here, else the reason it cannot.

    Tried once per process, for real: a program that prints a number must run in the sandbox.
    """
    if shutil.which("unshare") is None:
        return "the `unshare` tool (util-linux) is not installed"
    result = _run("print(6 * 7)", isolated=True, stdin="", timeout=10.0, memory_mb=256, max_output=1000,
                  disk_mb=1, max_processes=16, max_open_files=64)
    if result.infrastructure_error is not None:
        return result.infrastructure_error
    if result.returncode != 0 or result.stdout != "42\n":
        return f"a test program failed in the sandbox (exit status {result.returncode}): {result.stderr.strip()}"
    return None


def run_python(
    source: str,
    *,
    stdin: str = "",
    timeout: float = 10.0,
    memory_mb: int = 512,
    max_output: int = 64_000,
    disk_mb: int = 64,
    max_processes: int = 16,
    max_open_files: int = 256,
) -> SandboxResult:
    """Run ``source`` with ``python -I -S`` (the standard library only) in the sandbox.

    ``stdin`` is the program's standard input. It is killed with all its processes after
    ``timeout`` seconds of wall-clock time. Each of its processes may map ``memory_mb`` of address
    space and use ``ceil(timeout) + 1`` seconds of CPU. It may write ``disk_mb`` in all and have
    ``max_open_files`` files open per process. It may have ``max_processes`` processes and
    threads in all: ``RLIMIT_NPROC`` counts them, or where it does not apply, when the sandbox's
    user is the host's root, its pid namespace does (Linux 6.14+; older kernels make the sandbox
    unavailable to root). Memory is limited per process, so in all a sandbox may map up to
    ``memory_mb`` times ``max_processes``.

    When the sandbox is unavailable this returns a result whose ``infrastructure_error`` says so,
    unless ``TUNESMITH_SANDBOX=unisolated`` is set; then the program runs without isolation.
    """
    limits = dict(stdin=stdin, timeout=timeout, memory_mb=memory_mb, max_output=max_output, disk_mb=disk_mb,
                  max_processes=max_processes, max_open_files=max_open_files)
    reason = sandbox_available()
    if reason is None:
        return _run(source, isolated=True, **limits)
    if os.environ.get(UNISOLATED_ENV) == UNISOLATED_VALUE:
        _warn_unisolated(reason)
        return _run(source, isolated=False, **limits)
    return SandboxResult(
        returncode=None, stdout="", stderr="", truncated=False, timed_out=False, seconds=0.0,
        infrastructure_error=(
            f"the sandbox is unavailable: {reason}. Set {UNISOLATED_ENV}={UNISOLATED_VALUE} to run "
            "model-written code anyway, without isolation from your files, network and processes."
        ),
    )


@cache
def _warn_unisolated(reason: str) -> None:
    logger.warning("running model-written code WITHOUT isolation (%s=%s): %s",
                   UNISOLATED_ENV, UNISOLATED_VALUE, reason)


def _run(source, *, isolated, stdin, timeout, memory_mb, max_output, disk_mb, max_processes,
         max_open_files) -> SandboxResult:
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="tunesmith-sandbox-") as workdir:
        (Path(workdir) / "main.py").write_text(source, encoding="utf-8")
        status_read, status_write = os.pipe()
        settings = {
            "workdir": workdir,
            "home": os.path.expanduser("~"),
            "keep": [sys.base_prefix, str(Path(sys.executable).parent.parent)],
            "python": sys.executable,
            "unshare": shutil.which("unshare") if isolated else None,
            "env": ENVIRONMENT,
            "status_fd": status_write,
            "memory_bytes": memory_mb * 2**20,
            "cpu_seconds": math.ceil(timeout) + 1,
            "disk_bytes": disk_mb * 2**20,
            "max_processes": max_processes,
            "max_open_files": max_open_files,
        }
        command = [sys.executable, "-I", "-S", "-c", INIT_SOURCE, json.dumps(settings)]
        if isolated:
            command = [settings["unshare"], *NAMESPACES, "--kill-child=SIGKILL", *command]
        try:
            process = subprocess.Popen(
                command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                cwd=workdir, env=INIT_ENVIRONMENT, pass_fds=[status_write], start_new_session=True,
            )
        except OSError as error:
            os.close(status_read)
            return SandboxResult(
                returncode=None, stdout="", stderr="", truncated=False, timed_out=False,
                seconds=time.monotonic() - started, infrastructure_error=f"could not start the sandbox: {error}",
            )
        finally:
            os.close(status_write)
        with os.fdopen(status_read, "rb") as status:
            outputs, status_text, timed_out = _communicate(process, status, stdin.encode(), started + timeout,
                                                           max_output)
            if timed_out:
                _kill(process)
            else:
                process.wait()
    (stdout, stdout_cut), (stderr, stderr_cut) = outputs
    result = dict(stdout=stdout, stderr=stderr, truncated=stdout_cut or stderr_cut, timed_out=timed_out,
                  seconds=time.monotonic() - started)
    lines = status_text.decode(errors="replace").splitlines()
    if not lines or lines[0] != "ready":
        reason = lines[0].removeprefix("error ") if lines else stderr.strip() or "it exited before starting the program"
        return SandboxResult(returncode=None, infrastructure_error=f"the sandbox could not start: {reason}", **result)
    returncode = None  # the program did not finish: timed out, or its sandbox was killed from outside
    if len(lines) > 1:
        kind, number = lines[1].split()
        returncode = -int(number) if kind == "signal" else int(number)
    return SandboxResult(returncode=returncode, **result)


def _communicate(process, status, stdin: bytes, deadline: float, max_output: int):
    """Feed stdin and read stdout, stderr and the status pipe until all close or the deadline passes.

    Keeps at most ``max_output`` bytes of stdout and of stderr and drops the rest as it arrives.
    Returns ``[(stdout, cut), (stderr, cut)]``, the status bytes and whether the deadline passed.
    """
    kept = {process.stdout: bytearray(), process.stderr: bytearray(), status: bytearray()}
    cut = {process.stdout: False, process.stderr: False}
    with selectors.DefaultSelector() as selector:
        for stream in kept:
            selector.register(stream, selectors.EVENT_READ)
        if stdin:
            os.set_blocking(process.stdin.fileno(), False)
            selector.register(process.stdin, selectors.EVENT_WRITE)
        else:
            process.stdin.close()
        timed_out = ended = False
        while selector.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                timed_out = not ended
                break
            for key, _ in selector.select(remaining):
                stream = key.fileobj
                if stream is process.stdin:
                    try:
                        written = os.write(stream.fileno(), stdin)
                    except BrokenPipeError:
                        written = len(stdin)
                    stdin = stdin[written:]
                    if not stdin:
                        selector.unregister(stream)
                        stream.close()
                    continue
                chunk = os.read(stream.fileno(), READ_SIZE)
                if not chunk:
                    selector.unregister(stream)
                    if stream is status:  # the first process has exited: what is left is in the pipes
                        deadline = min(deadline, time.monotonic() + LINGER_SECONDS)
                        ended = True
                    continue
                room = max_output - len(kept[stream]) if stream is not status else len(chunk)
                kept[stream] += chunk[:room]
                if len(chunk) > room:
                    cut[stream] = True
    for stream in (process.stdin, process.stdout, process.stderr):
        stream.close()
    outputs = [(kept[s].decode(errors="replace"), cut[s]) for s in (process.stdout, process.stderr)]
    return outputs, bytes(kept[status]), timed_out


def _kill(process: subprocess.Popen) -> None:
    """Kill a sandbox and wait until every process in it is gone.

    Killing the pid namespace's first process, the child of ``unshare``, makes the kernel kill
    every other process in the namespace before that first one can be reaped; ``unshare`` reaps
    it, then exits. The process group's turn comes after, for an ``unshare`` that had not forked
    yet and for the unisolated mode, which has no pid namespace.
    """
    children = _children(process.pid)
    for child in children:
        _kill_quietly(os.kill, child)
    if children:
        try:
            process.wait(REAP_SECONDS)
        except subprocess.TimeoutExpired:
            pass
    _kill_quietly(os.killpg, process.pid)
    try:
        process.wait(REAP_SECONDS)
    except subprocess.TimeoutExpired:
        logger.warning("sandbox process %d did not exit %.0f s after SIGKILL", process.pid, REAP_SECONDS)


def _kill_quietly(kill, pid: int) -> None:
    try:
        kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid``, read from /proc."""
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            children.append(int(entry.name))
    return children
