"""Real discovery of a reward plugin: examples/reward-plugin, pip-installed into a folder of its own
(the shared venv is left alone), is listed by ``tunesmith plugins`` and loaded by ``--reward`` in a
new process that has that folder on its path."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "reward-plugin"
DISTRIBUTION = "tunesmith-keyword-reward"

LOAD_AND_RUN = """
from tunesmith import RewardRunner, create_plugin_manager, load_rewards

(reward,) = load_rewards(["contains_keyword:2"], create_plugin_manager())
print(reward.name, reward.weight, reward.required_columns)
result = RewardRunner([reward], timeout=10)(
    ["q", "q", "q"], ["Paris it is", "Lyon", [{"role": "assistant", "content": "PARIS"}]],
    {"keyword": ["paris", "paris", "paris"]}, ["data.jsonl:1", "data.jsonl:2", "data.jsonl:3"],
)
print(result.values["contains_keyword"], result.totals([reward]))
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict[str, str]:
    """The environment of a process that sees the example installed (and only it among third-party plugins)."""
    source = tmp_path_factory.mktemp("source") / "reward-plugin"
    shutil.copytree(EXAMPLE, source)  # pip builds in the source folder: keep the repository clean
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(source)],
        check=True, capture_output=True, text=True, timeout=120,
    )
    path = os.pathsep.join(filter(None, [str(target), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "TUNESMITH_PLUGINS": DISTRIBUTION, "COLUMNS": "200"}


def run_python(env: dict[str, str], *args: str) -> str:
    result = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"python {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def test_tunesmith_plugins_lists_the_installed_reward(installed):
    output = run_python(installed, "-m", "tunesmith", "plugins")
    row = next((line for line in output.splitlines() if "contains_keyword" in line), None)
    assert row is not None, output
    assert "reward" in row and DISTRIBUTION in row and "0.1.0" in row, row
    assert "failed to load" not in output


def test_load_rewards_finds_and_runs_the_installed_reward(installed):
    lines = run_python(installed, "-c", LOAD_AND_RUN).splitlines()
    assert lines == ["contains_keyword 2.0 ('keyword',)", "[1.0, 0.0, 1.0] [2.0, 0.0, 2.0]"]
