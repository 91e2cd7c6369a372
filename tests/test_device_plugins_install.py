"""Each device plugin is its own distribution: installed, it appears in ``tunesmith plugins`` and
``tunesmith devices``; uninstalled, everything else keeps working.

``make test`` installs every ``plugins/devices/NAME`` (editable); this test takes each out and
puts it back, running the CLI in a new process each time with every plugin allowed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_fake_device_install import venv_lock  # noqa: F401  (the venv is shared with that test's installs)

REPO = Path(__file__).resolve().parents[1]
PLUGINS = {"cuda": "tunesmith-cuda", "npu": "tunesmith-npu", "mps": "tunesmith-mps"}
TIMEOUT_S = 300


def tunesmith(*args: str) -> str:
    environment = {key: value for key, value in os.environ.items() if key != "TUNESMITH_PLUGINS"}  # every plugin loads
    environment["COLUMNS"] = "200"  # table cells whole, so names can be looked for
    result = subprocess.run([sys.executable, "-m", "tunesmith", *args], cwd=REPO, env=environment, capture_output=True, text=True,
                            timeout=TIMEOUT_S)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args, "--quiet", "--disable-pip-version-check"], check=True, timeout=TIMEOUT_S)


@pytest.mark.parametrize("name", sorted(PLUGINS))
def test_a_device_plugin_installs_and_uninstalls_on_its_own(name, venv_lock):  # noqa: F811
    distribution = PLUGINS[name]
    listed = tunesmith("devices", "--markdown")
    assert f"`{name}`" in listed.splitlines()[0], f"{distribution} is not installed: run `make install` (it installs plugins/devices/*)"
    try:
        pip("uninstall", "-y", distribution)
        without = tunesmith("devices", "--markdown").splitlines()[0]
        assert f"`{name}`" not in without and "`cpu`" in without
        others = [other for other in PLUGINS if other != name]
        assert all(f"`{other}`" in without for other in others), without
        assert distribution not in tunesmith("plugins")
        assert "auto device: " in tunesmith("env")
    finally:
        pip("install", "--no-deps", "-e", str(REPO / "plugins" / "devices" / name))
    assert distribution in tunesmith("plugins")


def test_env_says_why_each_installed_device_is_unavailable():
    report = " ".join(tunesmith("env").split())  # table cells may wrap: compare the words
    assert "auto device: " in report
    assert "torch_npu is not installed" in report  # no Ascend toolkit here
    if sys.platform != "darwin":
        assert "MPS needs macOS on Apple silicon" in report
