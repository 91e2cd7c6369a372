"""``tunesmith NAME``: one training command per registered trainer (``sft``, ``pt``, plugins' own)."""

from __future__ import annotations

from pathlib import Path

import click

from tunesmith.config import PluginOption, click_options, resolve_config
from tunesmith.errors import TrainingError, TunesmithError
from tunesmith.failure import unexpected_error_message, write_traceback


def make_train_command(trainer_name: str, description: str = "", plugin_options: dict[str, PluginOption] | None = None) -> click.Command:
    def run(config_file, **values):
        from tunesmith.engine import train
        from tunesmith.launch import launch_processes
        from tunesmith.plugins import create_plugin_manager
        from tunesmith.runtime import plan_training

        config = resolve_config(click.get_current_context(), values, config_file, plugin_options)
        manager = create_plugin_manager()
        plan = plan_training(trainer_name, config, manager)
        if plan.needs_launch:
            launch_processes(trainer_name, config, plan.launch)
            return
        try:
            train(trainer_name, config, manager, plan=plan)
        except TunesmithError:
            raise
        except Exception as error:
            explanation = plan.device.explain_error(error)
            if explanation is not None:
                raise TrainingError(f"{explanation} Checkpoints already written in {config.output_dir} are intact.") from None
            rank = plan.environment.rank
            log = write_traceback(Path(config.output_dir) / ("error.log" if rank == 0 else f"error-rank{rank}.log"))
            raise TrainingError(
                f"{unexpected_error_message(error, log)} Checkpoints already written in {config.output_dir} are intact."
            ) from None

    help_text = f"Train with the {trainer_name!r} objective: {description}" if description else f"Train with the {trainer_name!r} objective."
    return click.command(trainer_name, help=help_text, context_settings={"show_default": True})(click_options(run, plugin_options))
