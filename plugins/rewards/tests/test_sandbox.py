"""The sandbox for model-written code: that programs run, and that attacks on the host are contained.

Each attack test checks both that the attack failed and that the host is unharmed: nothing the
attack aimed at outside the sandbox changed, the run ended promptly, and this process is fine.
"""

import os
import resource
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tunesmith_rewards import sandbox
from tunesmith_rewards.sandbox import run_python, sandbox_available


@pytest.fixture
def isolated():
    """Skip where the sandbox cannot isolate programs, saying why."""
    reason = sandbox_available()
    if reason is not None:
        pytest.skip(f"the sandbox needs `unshare` and unprivileged user namespaces, unavailable here: {reason}")


@pytest.fixture
def victim(tmp_path):
    """A directory outside the sandbox holding one file, for attacks to aim at."""
    target = tmp_path / "victim"
    target.mkdir()
    (target / "data.txt").write_text("original")
    return target


def assert_untouched(victim: Path) -> None:
    assert sorted(p.name for p in victim.iterdir()) == ["data.txt"]
    assert (victim / "data.txt").read_text() == "original"


def processes_with(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def wait_for(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_runs_a_program(isolated):
    result = run_python("import sys\nprint(sys.stdin.read().upper())\nprint('oops', file=sys.stderr)", stdin="hi")
    assert (result.returncode, result.stdout, result.stderr) == (0, "HI\n", "oops\n")
    assert not result.timed_out and not result.truncated and result.infrastructure_error is None


def test_reports_exceptions_exit_statuses_and_signals(isolated):
    assert run_python("raise SystemExit(3)").returncode == 3
    crashed = run_python("1 / 0")
    assert crashed.returncode == 1 and "ZeroDivisionError" in crashed.stderr
    assert run_python("import os, signal\nos.kill(os.getpid(), signal.SIGTERM)").returncode == -15


def test_the_program_may_write_in_its_own_directory(isolated):
    source = (
        "import os, tempfile\n"
        "open('out.txt', 'w').write('x' * 1000)\n"
        "with tempfile.NamedTemporaryFile() as f: f.write(b'y')\n"
        "print(os.path.getsize('out.txt'), os.environ['HOME'] == os.getcwd())\n"
    )
    assert run_python(source).stdout == "1000 True\n"


def test_infinite_loop_times_out(isolated):
    started = time.monotonic()
    result = run_python("while True: pass", timeout=1.0)
    assert result.timed_out and result.returncode is None
    assert time.monotonic() - started < 5.0


def test_fork_bomb_is_contained(isolated):
    marker = f"forkbomb-{secrets.token_hex(4)}"
    source = f"import os\n# {marker}\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    started = time.monotonic()
    result = run_python(source, timeout=1.5, max_processes=32)
    assert result.timed_out
    assert time.monotonic() - started < 8.0
    assert processes_with(marker) == []
    assert subprocess.run(["true"]).returncode == 0  # this process can still fork


def test_memory_bomb_is_contained(isolated):
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    source = (
        "import resource\n"
        "chunks = []\n"
        "try:\n"
        "    while True:\n"
        "        chunks.append(bytearray(10 * 2**20))\n"
        "except MemoryError:\n"
        "    chunks.clear()\n"
        "    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)\n"
    )
    result = run_python(source, memory_mb=200, timeout=5)
    assert result.returncode == 0 and int(result.stdout) < 200  # peak MiB of the sandboxed process
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 50 * 1024  # KiB


def test_output_flood_is_capped(isolated):
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = run_python("while True:\n    print('x' * 10**6)", timeout=1.0, max_output=1000)
    assert result.timed_out and result.truncated
    assert len(result.stdout) == 1000
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 50 * 1024


def test_disk_is_capped(isolated):
    source = (
        "import errno\n"
        "try:\n"
        "    open('big', 'wb').write(b'x' * 20 * 2**20)\n"
        "except OSError as error:\n"
        "    print(errno.errorcode[error.errno])\n"
    )
    assert run_python(source, disk_mb=8).stdout in ("ENOSPC\n", "EFBIG\n")


def test_processes_are_capped(isolated):
    source = (
        "import os, time\n"
        "started = 0\n"
        "while True:\n"
        "    try:\n"
        "        if os.fork() == 0:\n"
        "            time.sleep(10)\n"
        "            os._exit(0)\n"
        "    except OSError:\n"
        "        break\n"
        "    started += 1\n"
        "print(started)\n"
    )
    result = run_python(source, max_processes=32, timeout=5)
    assert 0 < int(result.stdout) < 32 and not result.timed_out


def test_writing_outside_the_temporary_directory_fails(isolated, victim):
    escape = Path("/tmp") / f"tunesmith-escape-{secrets.token_hex(4)}"
    home_file = Path.home() / f"tunesmith-escape-{secrets.token_hex(4)}"
    repo_file = Path(__file__).with_name(f"escape-{secrets.token_hex(4)}")
    targets = [victim / "data.txt", victim / "new.txt", escape, home_file, repo_file, Path(sys.base_prefix) / "escape"]
    source = (
        "import os\n"
        f"for path in {[str(t) for t in targets]!r}:\n"
        "    try:\n"
        "        os.makedirs(os.path.dirname(path), exist_ok=True)\n"
        "        open(path, 'w').write('pwned')\n"
        "        print('wrote', path)\n"
        "    except OSError as error:\n"
        "        print('failed', path, error.strerror)\n"
    )
    result = run_python(source)
    assert result.returncode == 0, result.stderr
    assert_untouched(victim)
    for target in targets[2:]:
        assert not target.exists()
    assert f"failed {repo_file}" in result.stdout  # read-only where it is not hidden


def test_secrets_in_the_environment_are_not_readable(isolated, monkeypatch):
    secret = secrets.token_hex(16)
    monkeypatch.setenv("TUNESMITH_TEST_SECRET", secret)
    source = (
        "import os\n"
        "print(dict(os.environ))\n"
        f"for path in ['/proc/1/environ', '/proc/{os.getpid()}/environ', '/proc/{os.getppid()}/environ']:\n"
        "    try:\n"
        "        print(path, open(path, 'rb').read())\n"
        "    except OSError as error:\n"
        "        print(path, error)\n"
        "for pid in os.listdir('/proc'):\n"
        "    if pid.isdigit():\n"
        "        try:\n"
        "            print(open(f'/proc/{pid}/environ', 'rb').read())\n"
        "        except OSError:\n"
        "            pass\n"
    )
    result = run_python(source)
    assert result.returncode == 0, result.stderr
    assert "/proc/1/environ" in result.stdout
    assert secret not in result.stdout + result.stderr


def test_sockets_reach_nothing(isolated, tmp_path):
    tcp, unix, abstract = socket.socket(), socket.socket(socket.AF_UNIX), socket.socket(socket.AF_UNIX)
    with tcp, unix, abstract:
        tcp.bind(("127.0.0.1", 0))
        unix.bind(str(tmp_path / "listener.sock"))
        abstract.bind(f"\0tunesmith-test-{secrets.token_hex(4)}")
        listeners = [tcp, unix, abstract]
        for listener in listeners:
            listener.listen()
            listener.setblocking(False)
        addresses = [tcp.getsockname(), unix.getsockname(), abstract.getsockname(), ("1.1.1.1", 53)]
        source = (
            "import socket\n"
            f"for address in {addresses!r}:\n"
            "    family = socket.AF_INET if isinstance(address, tuple) else socket.AF_UNIX\n"
            "    try:\n"
            "        with socket.socket(family) as s:\n"
            "            s.settimeout(1)\n"
            "            s.connect(address)\n"
            "        print('connected', address)\n"
            "    except OSError as error:\n"
            "        print('failed', error)\n"
        )
        result = run_python(source)
        for listener in listeners:
            with pytest.raises(BlockingIOError):
                listener.accept()
    assert result.returncode == 0, result.stderr
    assert "connected" not in result.stdout and result.stdout.count("failed") == 4


def test_setsid_daemon_does_not_outlive_the_run(isolated):
    marker = f"daemon-{secrets.token_hex(4)}"
    source = (
        "import os, sys\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        f"        os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(30)', {marker!r}])\n"
        "    os._exit(0)\n"
        "print('parent done')\n"
    )
    result = run_python(source, timeout=5)
    assert result.stdout == "parent done\n" and not result.timed_out  # it did not wait for the daemon
    assert processes_with(marker) == []


def test_the_sandbox_ends_itself_when_its_host_dies(isolated):
    token = secrets.token_hex(4)
    marker = f"orphan-{token}"  # built in the sandbox, so that only the sandboxed process's command line has it
    sleeper = f"[sys.executable, '-c', 'import time; time.sleep(60)', 'orphan-' + {token!r}]"
    program = f"import os, sys\nos.execv(sys.executable, {sleeper})"
    host_source = f"from tunesmith_rewards.sandbox import run_python\nrun_python({program!r}, timeout=1.0)"
    host = subprocess.Popen([sys.executable, "-c", host_source], env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    try:
        assert wait_for(lambda: processes_with(marker), seconds=5.0)
    finally:
        host.kill()
        host.wait()
    assert wait_for(lambda: not processes_with(marker), seconds=6.0)


def test_the_program_cannot_signal_the_sandbox_away(isolated):
    source = (
        "import os, signal, time\n"
        "for number in (signal.SIGALRM, signal.SIGCHLD, signal.SIGINT, signal.SIGTERM, signal.SIGKILL):\n"
        "    os.kill(1, number)\n"
        "time.sleep(0.2)\n"
        "print('still here')\n"
    )
    result = run_python(source)
    assert (result.returncode, result.stdout) == (0, "still here\n")


def test_subclasses_escape_gains_nothing(isolated, victim):
    source = (
        "classes = ().__class__.__bases__[0].__subclasses__()\n"
        "python_class = [c for c in classes if hasattr(c.__init__, '__globals__')][0]\n"
        "builtins = python_class.__init__.__globals__['__builtins__']\n"
        "os = (builtins['__import__'] if isinstance(builtins, dict) else builtins.__import__)('os')\n"
        f"os.system('echo pwned > {victim}/data.txt; touch {victim}/new.txt')\n"
        "print(sorted(os.environ))\n"
    )
    result = run_python(source)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "['HOME', 'LANG', 'LC_ALL', 'PATH', 'TMPDIR']\n"
    assert_untouched(victim)


def test_ctypes_gains_nothing(isolated, victim):
    bystander = subprocess.Popen(["sleep", "30"])
    try:
        source = (
            "import ctypes, os\n"
            "libc = ctypes.CDLL(None, use_errno=True)\n"
            "CLONE_NEWUSER, CLONE_NEWNS, MS_REMOUNT, MS_BIND = 0x10000000, 0x20000, 0x20, 0x1000\n"
            "try:\n"
            "    print('setns', libc.setns(os.open('/proc/1/ns/mnt', os.O_RDONLY), 0))\n"
            "except OSError as error:\n"
            "    print('setns', error.strerror)\n"
            "print('unshare', libc.unshare(CLONE_NEWUSER | CLONE_NEWNS))\n"
            f"print('remount', libc.mount(None, b'{victim}', None, MS_REMOUNT | MS_BIND, None))\n"
            f"os.system('touch {victim}/new.txt')\n"
            "child = os.fork() or os.execv('/bin/sleep', ['sleep', '30'])\n"
            "print('kill', libc.kill(-1, 9))\n"
            "print('child killed by', os.WTERMSIG(os.waitpid(child, 0)[1]))\n"
        )
        result = run_python(source)
        assert "setns Permission denied" in result.stdout and "remount -1" in result.stdout
        assert "kill 0\nchild killed by 9" in result.stdout
        assert bystander.poll() is None  # kill(-1) reached the sandbox's pid namespace only
        assert_untouched(victim)
    finally:
        bystander.kill()
        bystander.wait()


def test_os_system_gains_nothing(isolated, victim):
    result = run_python(f"import os\nprint(os.system('echo pwned > {victim}/data.txt') != 0)")
    assert result.stdout == "True\n"
    assert_untouched(victim)


def test_refuses_without_isolation_unless_allowed(monkeypatch):
    monkeypatch.setattr(sandbox, "sandbox_available", lambda: "no user namespaces here")
    monkeypatch.delenv(sandbox.UNISOLATED_ENV, raising=False)
    refused = run_python("print(1)")
    assert refused.returncode is None and "no user namespaces here" in refused.infrastructure_error
    assert sandbox.UNISOLATED_ENV in refused.infrastructure_error

    monkeypatch.setenv(sandbox.UNISOLATED_ENV, sandbox.UNISOLATED_VALUE)
    monkeypatch.setenv("TUNESMITH_TEST_SECRET", "hidden")
    unisolated = run_python("import os\nprint(sorted(os.environ), flush=True)\nwhile True: pass", timeout=1.0)
    assert unisolated.infrastructure_error is None and unisolated.timed_out
    assert unisolated.stdout == "['HOME', 'LANG', 'LC_ALL', 'PATH', 'TMPDIR']\n"


def test_a_sandbox_that_cannot_start_is_an_infrastructure_error(monkeypatch):
    monkeypatch.setattr(sandbox, "sandbox_available", lambda: None)
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: "/nonexistent/unshare")
    result = run_python("print(1)")
    assert result.returncode is None and result.infrastructure_error.startswith("could not start the sandbox")

    monkeypatch.setattr(sandbox.shutil, "which", lambda name: "/bin/false")  # exits before the program
    result = run_python("print(1)")
    assert result.returncode is None and result.infrastructure_error.startswith("the sandbox could not start")


def test_the_availability_check_runs_the_sandbox_for_real(monkeypatch):
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: "/bin/false")
    assert "exited before starting the program" in sandbox.sandbox_available.__wrapped__()
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None)
    assert "`unshare` tool (util-linux) is not installed" in sandbox.sandbox_available.__wrapped__()
