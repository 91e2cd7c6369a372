"""Real discovery: pip-install the fake device into this venv, and the CLI in a new process picks it.

Every check in ``CHECKS`` runs three times: before the install (expecting ``cpu``), while the
fake device is installed (expecting ``fake``) and after ``pip uninstall`` (``cpu`` again). The
subprocesses see the same environment each time, with the fake allowed by ``TUNESMITH_PLUGINS``,
so only the installation differs.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

import pytest

from tests.helpers import chat_rows, read_metrics, write_jsonl

REPO = Path(__file__).resolve().parents[1]
FAKE_DEVICE = REPO / "tests" / "fake_device"
DISTRIBUTION = "tunesmith-fake-device"
TIMEOUT_S = 300


def cli_env(**overrides: str) -> dict[str, str]:
    return {**os.environ, "TUNESMITH_PLUGINS": DISTRIBUTION, **overrides}


def run_cli(args: list[str], expect_failure: bool = False, **env: str) -> subprocess.CompletedProcess:
    """``tunesmith ARGS`` in a new process of this venv; ``env`` adds environment variables."""
    script = Path(sys.executable).with_name("tunesmith")
    command = [str(script)] if script.exists() else [sys.executable, "-c", "from tunesmith.cli import main; main()"]
    result = subprocess.run(
        command + args, cwd=REPO, env=cli_env(**env), capture_output=True, text=True, timeout=TIMEOUT_S
    )
    assert (result.returncode != 0) == expect_failure, f"tunesmith {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result


def auto_device(env_output: str) -> str:
    match = re.search(r"^auto device: (\S+)", env_output, re.MULTILINE)
    assert match, f"no 'auto device:' line in:\n{env_output}"
    return match.group(1)


def device_row(*cells: str, output: str) -> bool:
    """Whether the devices table has a row starting with ``cells`` (whatever the box characters)."""
    return re.search(r"^\W*" + r"\W+".join(map(re.escape, cells)) + r"\W", output, re.MULTILINE) is not None


def check_env(expected_device: str, workdir: Path, model_dir: Path) -> None:
    log = workdir / "env-calls.log"
    output = run_cli(["env"], TUNESMITH_FAKE_DEVICE_LOG=str(log)).stdout
    assert auto_device(output) == expected_device
    if expected_device == "fake":
        assert device_row("fake", "10", "yes", DISTRIBUTION, output=output), output
        # env probes every device but initialises none
        assert set(log.read_text().split()) == {"probe"}
    else:
        assert not log.exists()


def check_sft(expected_device: str, workdir: Path, model_dir: Path) -> None:
    """The user story: the very same training command lands on whatever device is installed."""
    data = workdir / "train.jsonl"
    write_jsonl(data, chat_rows(4))
    log = workdir / "sft-calls.log"
    output_dir = workdir / "run"
    command = ["sft", "--model", str(model_dir), "--dataset", str(data), "--output-dir", str(output_dir),
               "--max-steps", "2", "--batch-size", "2", "--save-steps", "0"]
    output = run_cli(command, TUNESMITH_FAKE_DEVICE_LOG=str(log)).stdout
    assert f"device: {expected_device} " in output, output
    assert {line["device"] for line in read_metrics(output_dir)} == {expected_device}
    if expected_device == "fake":
        assert {"setup:0", "seed", "autocast", "memory_stats"} <= set(log.read_text().split())
        assert {line["memory_peak_bytes"] for line in read_metrics(output_dir)} == {64 * 2**20}  # simulated


def check_two_processes(workdir: Path, model_dir: Path) -> None:
    """Two fake devices: --nproc-per-node auto starts one process per device, talking through the fake's backend."""
    workdir.mkdir()
    data = write_jsonl(workdir / "corpus.jsonl", [{"text": f"line {i} of a corpus"} for i in range(8)])
    log = workdir / "calls.log"
    output_dir = workdir / "run"
    command = ["pt", "--model", str(model_dir), "--dataset", str(data), "--output-dir", str(output_dir), "--max-steps", "2",
               "--batch-size", "2", "--save-steps", "0", "--strategy", "ddp", "--nproc-per-node", "auto"]
    output = run_cli(command, TUNESMITH_FAKE_DEVICE_LOG=str(log), TUNESMITH_FAKE_DEVICE_COUNT="2").stdout
    assert "device: fake " in output and "processes: 2" in output, output
    calls = log.read_text().split()
    assert {"device_count", "setup:0", "setup:1"} <= set(calls), calls
    assert calls.count("process_group") == 2, calls  # one per process, made by the fake's backend
    assert [line["step"] for line in read_metrics(output_dir)] == [1, 2]  # written once, by rank 0


def check_infer_and_export(workdir: Path, model_dir: Path) -> None:
    """Every command runs on the selected device, and refuses what the device cannot do before loading anything."""
    adapter = workdir / "run" / "final"  # trained by check_sft
    log = workdir / "infer-calls.log"
    reply = run_cli(["infer", "--adapter", str(adapter), "--prompt", "hi", "--max-new-tokens", "2"], TUNESMITH_FAKE_DEVICE_LOG=str(log))
    assert "device: fake " in reply.stderr and "precision: fp32" in reply.stderr, reply.stderr
    assert "setup:0" in log.read_text().split()
    merged = run_cli(["export", "--adapter", str(adapter), "--output", str(workdir / "merged")])
    assert "device: fake " in merged.stderr and (workdir / "merged" / "model.safetensors").is_file(), merged.stderr

    log = workdir / "refused-calls.log"
    refused = run_cli(["infer", "--model", str(workdir / "no-such-model"), "--precision", "fp16", "--prompt", "hi"],
                      expect_failure=True, TUNESMITH_FAKE_DEVICE_LOG=str(log))
    assert "error: --precision fp16: device 'fake' cannot compute in fp16; it supports fp32, bf16" in refused.stderr, refused.stderr
    assert "setup:0" not in log.read_text().split()
    refused = run_cli(["sft", "--model", str(workdir / "no-such-model"), "--dataset", str(workdir / "train.jsonl"),
                       "--output-dir", str(workdir / "refused"), "--precision", "fp16"], expect_failure=True)
    assert "error: --precision fp16: device 'fake' cannot compute in fp16" in refused.stderr, refused.stderr


#: each check(expected_device, workdir, model_dir) runs before install, while installed and after uninstall
CHECKS = [check_env, check_sft]


def run_checks(expected_device: str, workdir: Path, model_dir: Path) -> None:
    workdir.mkdir()
    for check in CHECKS:
        check(expected_device, workdir, model_dir)


def pip(*args: str) -> None:
    command = [sys.executable, "-m", "pip", *args, "--quiet", "--disable-pip-version-check"]
    subprocess.run(command, check=True, timeout=TIMEOUT_S)


def is_installed() -> bool:
    try:
        metadata.distribution(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return False
    return True


def run_fake_device_tests() -> str:
    """The fake's own tests, run as its authors would: its directory is their rootdir."""
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", str(FAKE_DEVICE / "tests")],
        cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=TIMEOUT_S,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@contextlib.contextmanager
def fake_device_installed(tmp_path: Path):
    """Install the fake device for the duration of the block; uninstall it whatever happens."""
    # setuptools builds in the source tree, and a stale build/ there would be packaged again:
    # build from a copy instead.
    source = tmp_path / "fake_device"
    shutil.copytree(FAKE_DEVICE, source, ignore=shutil.ignore_patterns("tests", "build", "*.egg-info", "__pycache__"))
    try:
        pip("install", "--no-deps", "--no-build-isolation", str(source))
        yield
    finally:
        pip("uninstall", "-y", DISTRIBUTION)


@pytest.fixture
def venv_lock():
    """The venv is shared: two runs of this test at once would install over each other."""
    venv_id = hashlib.sha1(sys.prefix.encode()).hexdigest()[:12]
    lock_path = Path(tempfile.gettempdir()) / f"tunesmith-fake-device-{venv_id}.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield
        fcntl.flock(lock, fcntl.LOCK_UN)


def test_installing_and_uninstalling_the_fake_device_changes_auto_selection(tmp_path, venv_lock, tiny_model_dir):
    if is_installed():
        pytest.fail(f"{DISTRIBUTION} is already installed in {sys.prefix}; `pip uninstall -y {DISTRIBUTION}` first")

    run_checks("cpu", tmp_path / "before", tiny_model_dir)

    with fake_device_installed(tmp_path):
        run_checks("fake", tmp_path / "installed", tiny_model_dir)

        unavailable = run_cli(["env"], TUNESMITH_FAKE_DEVICE_AVAILABLE="0").stdout
        assert auto_device(unavailable) == "cpu"
        assert device_row("fake", "10", "no", output=unavailable), unavailable

        check_two_processes(tmp_path / "two-processes", tiny_model_dir)
        check_infer_and_export(tmp_path / "installed", tiny_model_dir)

        conformance = run_fake_device_tests()
        assert "not installed" not in conformance, conformance
        assert "probe says it is not available here" in conformance, conformance  # TestFakeDeviceUnavailable

    assert not is_installed()
    run_checks("cpu", tmp_path / "uninstalled", tiny_model_dir)
