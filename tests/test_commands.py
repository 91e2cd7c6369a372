"""Commands registered by plugins through ``tunesmith_register_commands``."""

from __future__ import annotations

import click
import pytest

from tests.helpers import TrainerPlugin, run_cli
from tunesmith import cli
from tunesmith.errors import PluginError
from tunesmith.hooks import hookimpl
from tunesmith.plugins import create_plugin_manager
from tunesmith.records import CommandSpec


@click.command()
@click.option("--name", default="world")
def hello_command(name):
    """Say hello."""
    click.echo(f"hello {name}")


class CommandPlugin:
    def __init__(self, name: str, command=hello_command):
        self.spec = CommandSpec(name=name, command=command, description="says hello")

    @hookimpl
    def tunesmith_register_commands(self):
        return [self.spec]


@pytest.fixture
def manager(monkeypatch):
    """The manager the CLI uses, with in-test plugins registered on it."""
    manager = create_plugin_manager()
    monkeypatch.setattr(cli, "_manager", lambda: manager)
    return manager


def test_a_plugin_command_runs_and_is_listed_without_being_imported(manager, capsys):
    manager.register(CommandPlugin("hello"), "hello-plugin", distribution="hello-dist")
    manager.register(CommandPlugin("lazy", "no_such_module_anywhere:command"), "lazy-plugin", distribution="lazy-dist")
    assert run_cli("hello", "--name", "tunesmith") == 0
    assert capsys.readouterr().out == "hello tunesmith\n"
    assert run_cli("--help") == 0  # lists the unimportable command by its description
    listed = capsys.readouterr().out
    assert "hello" in listed and "lazy" in listed and "serve" in listed and "says hello" in listed


def test_the_builtin_serve_command_registers_through_the_hook():
    registered = create_plugin_manager().collect("command")["serve"]
    assert registered.distribution == "tunesmith" and registered.spec.command == "tunesmith.commands.serve:serve_command"


@pytest.mark.parametrize(("name", "taken_by"), [("infer", "built-in command 'infer'"), ("shadow", "trainer 'shadow'")])
def test_a_command_named_like_another_is_refused_naming_both(manager, capsys, name, taken_by):
    manager.register(TrainerPlugin("shadow", "tunesmith_trainers.causal_lm:CausalLMTrainer"), "trainer-plugin", distribution="trainer-dist")
    manager.register(CommandPlugin(name), "clashing-plugin", distribution="clash-dist")
    assert run_cli("--help") == 2
    error = capsys.readouterr().err
    assert f"command {name!r} from plugin clashing-plugin (distribution clash-dist)" in error and taken_by in error


def test_a_command_record_is_validated():
    with pytest.raises(PluginError, match="invalid command name"):
        CommandSpec(name="Bad Name", command=hello_command)
    with pytest.raises(PluginError, match="neither a click command nor a dotted path"):
        CommandSpec(name="bad", command=print)
