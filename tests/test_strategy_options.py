"""Options a strategy plugin declares become flags and YAML keys of every training command, and
reach the strategy; options of a strategy the run does not use are refused."""

from __future__ import annotations

import pytest

from tests.helpers import chat_rows, run_cli, write_jsonl
from tunesmith.commands.train import make_train_command
from tunesmith.config import collect_plugin_options, resolve_config
from tunesmith.engine import train
from tunesmith.errors import PluginError
from tunesmith.hooks import hookimpl
from tunesmith.plugins import create_plugin_manager
from tunesmith.records import OptionSpec, StrategySpec
from tunesmith.strategy import SingleDeviceStrategy


class KnobStrategy(SingleDeviceStrategy):
    """One process, remembering the options it was given."""

    seen: dict = {}

    def setup_environment(self):
        KnobStrategy.seen = dict(self.options)
        super().setup_environment()


class KnobPlugin:
    def __init__(self, *options: OptionSpec):
        self.options = options

    @hookimpl
    def tunesmith_register_strategies(self):
        return [StrategySpec(name="knob", strategy=KnobStrategy, options=self.options)]


def resolved(manager, args, config_file=None):
    options = collect_plugin_options(manager)
    command = make_train_command("sft", "", options)
    context = command.make_context("sft", [str(a) for a in args])
    values = dict(context.params)
    values.pop("config_file")
    return resolve_config(context, values, config_file, options)


def test_a_strategy_option_is_a_flag_and_a_yaml_key_and_reaches_the_strategy(tiny_model_dir, tmp_path):
    manager = create_plugin_manager()
    manager.register(KnobPlugin(OptionSpec("knob_level", 1, "How far to turn the knob."), OptionSpec("knob_on", False, "Turn it on.")), "knob")
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(4))
    common = ["--model", tiny_model_dir, "--dataset", data, "--strategy", "knob", "--max-steps", "1", "--save-steps", "0"]

    config = resolved(manager, [*common, "--knob-level", "3", "--knob-on", "--output-dir", tmp_path / "flags"])
    assert {key: config.plugin_options[key] for key in ("knob_level", "knob_on")} == {"knob_level": 3, "knob_on": True}
    assert config.to_dict()["knob_level"] == 3
    train("sft", config, manager=manager)
    assert KnobStrategy.seen == {"knob_level": 3, "knob_on": True}
    assert "knob_level: 3" in (tmp_path / "flags" / "config.yaml").read_text()

    yaml_file = tmp_path / "options.yaml"
    yaml_file.write_text("knob_level: 5\n")
    assert resolved(manager, [*common, "--output-dir", tmp_path / "yaml"], yaml_file).plugin_options["knob_level"] == 5
    yaml_file.write_text("knob_level: many\n")
    with pytest.raises(Exception, match="knob_level"):
        resolved(manager, common, yaml_file)


def test_an_option_of_another_strategy_is_refused(tiny_model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(4))
    assert run_cli("sft", "--model", tiny_model_dir, "--dataset", data, "--strategy", "ddp", "--fsdp-cpu-offload") != 0
    assert "--fsdp-cpu-offload is an option of strategy fsdp; this run uses --strategy ddp" in capsys.readouterr().err


def test_help_lists_strategy_options_with_their_owner(capsys):
    assert run_cli("pt", "--help") == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "--fsdp-cpu-offload / --no-fsdp-cpu-offload" in out and "(option of strategy fsdp)" in out


def test_a_strategy_option_may_not_take_a_core_option_name():
    manager = create_plugin_manager()
    manager.register(KnobPlugin(OptionSpec("learning_rate", 1.0, "Clashes.")), "knob")
    with pytest.raises(PluginError, match="declares option 'learning_rate', which is tunesmith's own"):
        collect_plugin_options(manager)
