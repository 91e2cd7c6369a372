"""The ``tunesmith`` command line: a click group whose training commands come from trainer plugins
and whose other plugin commands come from ``tunesmith_register_commands``."""

from __future__ import annotations

import os
import sys
import time
import warnings

import click

from tunesmith.commands.devices import devices_command
from tunesmith.commands.env import env_command
from tunesmith.commands.export import export_command
from tunesmith.commands.infer import infer_command
from tunesmith.commands.plugins import plugins_command
from tunesmith.commands.score import score_command
from tunesmith.commands.verify import verify_command
from tunesmith.errors import PluginError, Stopped, TunesmithError
from tunesmith.failure import leave_for_launcher, process_rank, unexpected_error_message, write_traceback
from tunesmith.records import Registered

BUILTIN_COMMANDS = {
    "plugins": plugins_command,
    "env": env_command,
    "devices": devices_command,
    "infer": infer_command,
    "export": export_command,
    "score": score_command,
    "verify": verify_command,
}


class TunesmithGroup(click.Group):
    """Built-in commands, one training command per registered trainer, and every command a
    plugin registers (``tunesmith_register_commands``)."""

    def list_commands(self, ctx):
        manager = _manager()
        return sorted(set(BUILTIN_COMMANDS) | set(manager.collect("trainer")) | set(plugin_commands(manager)))

    def get_command(self, ctx, name):
        if name in BUILTIN_COMMANDS:
            return BUILTIN_COMMANDS[name]
        manager = _manager()
        trainers = manager.collect("trainer")
        if name in trainers:
            from tunesmith.commands.train import make_train_command
            from tunesmith.config import collect_plugin_options

            return make_train_command(name, trainers[name].spec.description, collect_plugin_options(manager, trainer=name))
        registered = plugin_commands(manager).get(name)
        return registered.load() if registered is not None else None

    def format_commands(self, ctx, formatter):
        """As click lists commands, except that a plugin's command is described by its record,
        so that listing it does not import its module."""
        registered = plugin_commands(_manager())
        names = self.list_commands(ctx)
        limit = formatter.width - 6 - max(map(len, names))
        rows = []
        for name in names:
            if name in registered:
                rows.append((name, registered[name].spec.description))
                continue
            command = self.get_command(ctx, name)
            if command is not None and not command.hidden:
                rows.append((name, command.get_short_help_str(limit=limit)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


def plugin_commands(manager) -> dict[str, Registered]:
    """The registered commands by name; one named like a built-in command or a trainer is an error naming both."""
    trainers = manager.collect("trainer")
    commands = manager.collect("command")
    for name, registered in commands.items():
        source = f"command {name!r} from plugin {registered.plugin} (distribution {registered.distribution})"
        if name in BUILTIN_COMMANDS:
            raise PluginError(f"{source} has the name of the built-in command {name!r}; it needs another name")
        if name in trainers:
            trainer = trainers[name]
            raise PluginError(
                f"{source} has the name of the trainer {name!r} from plugin {trainer.plugin} "
                f"(distribution {trainer.distribution}), whose training command it would hide; one of them needs another name"
            )
    return commands


def _manager():
    from tunesmith.plugins import create_plugin_manager

    return create_plugin_manager()


@click.group(cls=TunesmithGroup, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="tunesmith")
# The deepspeed launcher starts `python -m tunesmith --local_rank=N ...`; tunesmith reads the
# LOCAL_RANK variable it also sets, so the argument is accepted and ignored.
@click.option("--local_rank", "--local-rank", type=int, default=None, hidden=True, expose_value=False)
def cli():
    """tunesmith: fine-tune, align and serve language models on any hardware."""


def main(argv: list[str] | None = None) -> None:
    # Hugging Face's own bars (loading weights, writing shards) would interleave with ours, and
    # fill a log file with carriage returns; tunesmith says what it is doing itself.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # peft asks transformers a deprecated question on every adapter load; nothing a user can act on.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    # A skipped step (fp16 overflow, a non-finite loss) still moves the schedule on, on purpose.
    warnings.filterwarnings("ignore", message=".*lr_scheduler.step\\(\\)` before `optimizer.step\\(\\)`.*", category=UserWarning)
    try:
        code = cli.main(args=argv, prog_name="tunesmith", standalone_mode=False)
        if isinstance(code, int) and code:  # a command ended with click.exceptions.Exit(code)
            sys.exit(code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as error:
        error.show()
        sys.exit(error.exit_code)
    except click.exceptions.Exit as done:
        sys.exit(done.exit_code)
    except Stopped as stopped:
        _fail(str(stopped), stopped.exit_code, label=None)
    except TunesmithError as error:
        _fail(str(error), error.exit_code)
    except Exception as error:
        from tunesmith.models import cache_root

        log = write_traceback(cache_root() / "logs" / f"error-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log")
        _fail(unexpected_error_message(error, log), 1)


def _fail(message: str, exit_code: int, label: str | None = "error") -> None:
    """Show ``message`` after ``label`` (or leave it for tunesmith's launcher to show) and exit."""
    if not leave_for_launcher(message, exit_code):
        prefix, rank = label or "", process_rank()
        if rank is not None:
            prefix = f"{prefix} (rank {rank})" if prefix else f"rank {rank}"
        click.echo(f"{prefix}: {message}" if prefix else message, err=True)
    sys.exit(exit_code)
