"""The tunesmith-rewards distribution (plugins/rewards), tested without installing it: its
registration through a plugin manager, and its own value tests, collected here too."""

import sys
from pathlib import Path

import pytest

REWARDS = Path(__file__).resolve().parents[1] / "plugins" / "rewards"
sys.path[:0] = [str(REWARDS), str(REWARDS / "tests")]

# the distribution's value tests, run by this suite too
from test_accuracy import *  # noqa: E402,F401,F403
from test_code_reward import *  # noqa: E402,F401,F403
from test_cosine import *  # noqa: E402,F401,F403
from test_format import *  # noqa: E402,F401,F403
from test_length import *  # noqa: E402,F401,F403
from test_overlong import *  # noqa: E402,F401,F403
from test_repetition import *  # noqa: E402,F401,F403
from test_sandbox import *  # noqa: E402,F401,F403

from tunesmith.plugins import create_plugin_manager  # noqa: E402
from tunesmith_rewards import plugin  # noqa: E402


def test_registers_its_rewards_by_dotted_path():
    manager = create_plugin_manager()
    manager.register(plugin, "tunesmith-rewards:rewards", distribution="tunesmith-rewards", version="0.1.0")
    rewards = manager.collect("reward")
    assert set(rewards) == {"accuracy", "code", "format", "cosine", "repetition", "soft_overlong", "length"}
    assert {r.distribution for r in rewards.values()} == {"tunesmith-rewards"}
    loaded = {name: registered.load() for name, registered in rewards.items()}
    assert loaded["accuracy"](["What is 6*7?"], ["<think>6*7</think><answer>42</answer>"], answer=["42"]) == [1.0]
    assert all(callable(fn) for fn in loaded.values())
    assert loaded["code"].__name__ == "code_reward"


def test_the_entry_point_names_the_plugin_module():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((REWARDS / "pyproject.toml").read_text())["project"]
    assert project["name"] == "tunesmith-rewards"
    assert project["entry-points"]["tunesmith"] == {"rewards": "tunesmith_rewards.plugin"}
