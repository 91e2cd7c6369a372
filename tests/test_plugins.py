"""The plugin core: discovery, records, duplicates, failures, allow-list, device selection."""

from __future__ import annotations

import warnings
from importlib import metadata
from types import SimpleNamespace

import pytest

from tunesmith import plugins as plugins_module
from tunesmith.errors import PluginError
from tunesmith.hooks import hookimpl
from tunesmith.plugins import AllowListWarning, PluginLoadWarning, create_plugin_manager
from tunesmith.records import DeviceSpec, RewardSpec


def test_builtins_register_through_entry_points():
    manager = create_plugin_manager()
    assert set(manager.collect("trainer")) >= {"sft", "pt"}
    assert set(manager.collect("optimizer")) >= {"adamw", "sgd"}
    assert "single" in manager.collect("strategy")
    cpu = manager.collect("device")["cpu"]
    assert cpu.distribution == "tunesmith"
    assert cpu.plugin == "tunesmith:builtin"


def test_names_are_validated():
    with pytest.raises(PluginError, match="invalid reward name 'Bad Name'"):
        RewardSpec(name="Bad Name", fn=len)


class DevicePlugin:
    def __init__(self, name, priority, available=True):
        self.spec = DeviceSpec(name=name, device="tunesmith.devices.cpu:CPUDevice", probe=lambda: available, priority=priority)

    @hookimpl
    def tunesmith_register_devices(self):
        return [self.spec]


def test_duplicate_name_names_both_distributions():
    manager = create_plugin_manager()
    manager.register(DevicePlugin("cpu", 5), "dup", distribution="other-dist", version="1.0")
    with pytest.raises(PluginError) as error:
        manager.collect("device")
    assert "tunesmith" in str(error.value) and "other-dist" in str(error.value)


def test_auto_picks_highest_priority_available_device():
    manager = create_plugin_manager()
    manager.register(DevicePlugin("fast", 50, available=False), "fast")
    manager.register(DevicePlugin("medium", 10), "medium")
    choice = manager.select_device("auto")
    assert choice.candidate.name == "medium"
    assert "highest priority" in choice.reason


def test_auto_refuses_a_tie():
    manager = create_plugin_manager()
    manager.register(DevicePlugin("one", 10), "one")
    manager.register(DevicePlugin("two", 10), "two")
    with pytest.raises(PluginError, match="tie.*--device"):
        manager.select_device("auto")


def test_explicit_missing_or_unavailable_device_lists_installed():
    manager = create_plugin_manager()
    manager.register(DevicePlugin("gone", 10, available=False), "gone")
    with pytest.raises(PluginError, match="no such device.*cpu"):
        manager.select_device("tpu")
    with pytest.raises(PluginError, match="not available.*gone"):
        manager.select_device("gone")
    assert manager.select_device("cpu").candidate.name == "cpu"


def test_a_plugin_can_take_over_selection():
    class Policy:
        @hookimpl
        def tunesmith_select_device(self, requested, candidates):
            return next(c for c in candidates if c.name == "cpu")

    manager = create_plugin_manager()
    manager.register(DevicePlugin("other", 99), "other")
    manager.register(Policy(), "policy")
    assert manager.select_device("auto").candidate.name == "cpu"


def fake_entry_point(name, value, dist_name):
    return metadata.EntryPoint(name=name, value=value, group="tunesmith")._for(SimpleNamespace(name=dist_name, version="9.9"))


@pytest.fixture
def extra_entry_points(monkeypatch):
    real = metadata.entry_points

    def install(*eps):
        monkeypatch.setattr(
            plugins_module.metadata, "entry_points", lambda group: list(real(group=group)) + list(eps)
        )

    return install


def test_broken_plugin_warns_and_others_keep_working(extra_entry_points, monkeypatch):
    monkeypatch.delenv("TUNESMITH_PLUGINS", raising=False)
    extra_entry_points(fake_entry_point("broken", "no_such_module_anywhere", "broken-dist"))
    with pytest.warns(PluginLoadWarning, match="broken.*broken-dist"):
        manager = create_plugin_manager()
    assert "sft" in manager.collect("trainer")
    assert manager.failures[0][1] == "broken-dist"


def test_allow_list(extra_entry_points, monkeypatch):
    extra_entry_points(fake_entry_point("extra", "tests.example_plugin", "extra-dist"))
    monkeypatch.setenv("TUNESMITH_PLUGINS", "")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        manager = create_plugin_manager()
    assert "tunesmith:builtin" in manager.origins and not any("extra" in n for n in manager.origins)
    monkeypatch.setenv("TUNESMITH_PLUGINS", "extra-dist")
    manager = create_plugin_manager()
    assert "extra-dist:extra" in manager.origins
    assert manager.collect("reward")["example-length"].distribution == "extra-dist"


def test_an_allow_list_name_matching_no_plugin_warns_once_naming_what_is_installed(extra_entry_points, monkeypatch):
    extra_entry_points(fake_entry_point("extra", "tests.example_plugin", "extra-dist"))
    monkeypatch.setenv("TUNESMITH_PLUGINS", "extra-dist, bogus-allow-list-name")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        manager = create_plugin_manager()
        create_plugin_manager()  # a command builds several managers; the user hears about it once
    messages = [str(w.message) for w in caught if issubclass(w.category, AllowListWarning)]
    assert len(messages) == 1, messages
    assert "TUNESMITH_PLUGINS names 'bogus-allow-list-name'" in messages[0]
    assert "extra-dist (entry point extra)" in messages[0].split("installed plugins: ")[1]
    assert "extra-dist:extra" in manager.origins  # the names that match still load


@pytest.mark.parametrize("names", ["extra", "Extra_Dist", "extra-dist,tunesmith"])
def test_allow_list_names_matching_a_plugin_do_not_warn(extra_entry_points, monkeypatch, names):
    extra_entry_points(fake_entry_point("extra", "tests.example_plugin", "extra-dist"))
    monkeypatch.setenv("TUNESMITH_PLUGINS", names)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert "extra-dist:extra" in create_plugin_manager().origins


def test_plugins_command_prints_the_table(capsys):
    from tests.helpers import run_cli

    assert run_cli("plugins") == 0
    rows = [" ".join(line.replace("│", " ").split()) for line in capsys.readouterr().out.splitlines()]
    assert any(row.startswith("device cpu tunesmith") and " yes " in f" {row} " for row in rows), rows
    assert any(row.startswith("trainer sft tunesmith") for row in rows)
    assert any(row.startswith("optimizer adamw tunesmith") for row in rows)
    assert any(row.startswith("strategy single tunesmith") for row in rows)
    assert any(row.startswith("command serve tunesmith") for row in rows)


@pytest.mark.parametrize("command", ["plugins", "env"])
def test_plugin_tables_fit_an_80_column_terminal_and_cut_nothing(command, extra_entry_points, monkeypatch, capsys):
    from tests.helpers import run_cli

    long_name = "tunesmith-a-distribution-with-a-name-much-too-long-for-its-column"
    extra_entry_points(fake_entry_point("extra", "tests.example_plugin", long_name))
    monkeypatch.setenv("TUNESMITH_PLUGINS", long_name)
    monkeypatch.setenv("COLUMNS", "80")
    assert run_cli(command) == 0
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) <= 80, out
    assert "…" not in out  # long cells wrap or fold rather than being cut short
    # Every word of the cpu device's description is there, wrapped over lines.
    words = " ".join(out.replace("│", " ").split())
    for word in create_plugin_manager().collect("device")["cpu"].spec.description.split():
        assert f" {word} " in f" {words} ", out
    if command == "plugins":
        cells = [line.split("│")[3].strip() for line in out.splitlines() if line.count("│") == 7]
        assert long_name in "".join(cells)


class RaisingPlugin:
    @hookimpl
    def tunesmith_register_rewards(self):
        raise RuntimeError("boom")


class WrongRecordPlugin:
    @hookimpl
    def tunesmith_register_trainers(self):
        return ["not a record"]


def test_a_misbehaving_hook_is_reported_and_skipped():
    manager = create_plugin_manager()
    manager.register(RaisingPlugin(), "raising", distribution="raising-dist")
    manager.register(WrongRecordPlugin(), "wrong", distribution="wrong-dist")
    with pytest.warns(PluginLoadWarning, match="raising.*raising-dist.*boom"):
        assert manager.collect("reward") == {}
    with pytest.warns(PluginLoadWarning, match="wrong.*not a TrainerSpec"):
        assert set(manager.collect("trainer")) >= {"sft", "pt"}
    assert {failure[1] for failure in manager.failures} == {"raising-dist", "wrong-dist"}


def test_a_misspelled_hook_drops_only_that_plugin(extra_entry_points, monkeypatch):
    monkeypatch.setenv("TUNESMITH_PLUGINS", "typo-dist")
    extra_entry_points(fake_entry_point("typo", "tests.misspelled_plugin", "typo-dist"))
    with pytest.warns(PluginLoadWarning, match="typo-dist.*unknown hook"):
        manager = create_plugin_manager()
    assert "sft" in manager.collect("trainer")
    assert not any("typo" in name for name in manager.origins if manager.pm.has_plugin(name))


def test_an_unimportable_class_names_its_plugin():
    from tunesmith.records import Registered

    spec = DeviceSpec(name="ghost", device="no_such_module:Nope", probe=lambda: True, priority=99)
    with pytest.raises(PluginError, match="ghost.*ghost-dist.*could not be imported"):
        Registered(spec, "ghost-plugin", "ghost-dist", "1.0").load()


def test_importing_tunesmith_leaves_heavy_backends_alone():
    import subprocess
    import sys

    heavy = ["torch_npu", "deepspeed", "megatron", "peft", "transformers"]
    code = "import sys, tunesmith, tunesmith.cli; print(','.join(m for m in %r if m in sys.modules))" % heavy
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


def test_registering_after_a_collect_is_seen_and_failures_are_reported_once():
    manager = create_plugin_manager()
    assert "late" not in manager.collect("device")
    manager.register(DevicePlugin("late", 5), "late")
    assert "late" in manager.collect("device")
    manager.register(RaisingPlugin(), "raising", distribution="raising-dist")
    with pytest.warns(PluginLoadWarning):
        manager.collect("reward")
    manager.unregister("late")
    assert "late" not in manager.collect("device")
    manager.collect("reward")
    assert len(manager.failures) == 1


def test_import_tunesmith_is_cheap_and_every_public_name_resolves():
    import subprocess
    import sys

    code = (
        "import sys, tunesmith; cheap = 'torch' not in sys.modules; "
        "[getattr(tunesmith, name) for name in tunesmith.__all__]; print(cheap)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "True"


def test_plugins_use_only_the_public_api():
    """A built-in plugin imports from ``tunesmith`` (or ``tunesmith.testing``) only, as a third party would."""
    import re
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    private = re.compile(r"^\s*(from|import) tunesmith\.(?!testing\b)[a-z_.]+", re.MULTILINE)
    sources = [*repo.glob("plugins/*/tunesmith_*/*.py"), *repo.glob("tests/fake_device/tunesmith_fake_device/*.py")]
    assert sources
    offenders = [f"{path.relative_to(repo)}: {match.group(0).strip()}" for path in sources for match in private.finditer(path.read_text())]
    assert offenders == []
