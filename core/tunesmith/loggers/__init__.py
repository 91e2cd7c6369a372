"""Experiment trackers: where a run's metrics lines go besides the terminal.

Every line the training loop logs (a training step, an evaluation, a GRPO step with its
per-reward scores) goes to each logger the run uses: the built-in ``jsonl`` logger
(``OUTPUT/metrics.jsonl``, always on) plus those ``--report-to NAME`` chooses among the
registered ones (``tensorboard``, ``wandb``, ``mlflow``, ``trackio``, plugins' own; ``all`` for every one
whose package is installed, ``none`` for none, as TRL spells it). Only the first process of a run logs. A tracker's package is
imported only when a run chooses it.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import click

from tunesmith.errors import ConfigError, PluginError

#: the logger every run uses, whatever ``--report-to`` says
ALWAYS_ON = "jsonl"
#: the ``--report-to`` value meaning every registered logger whose packages are installed
ALL = "all"
#: the ``--report-to`` value meaning no tracker besides ``metrics.jsonl`` (TRL's ``report_to: none``)
NONE = "none"


class MetricsLogger(ABC):
    """One experiment tracker, fed a run's metrics lines.

    The first process of a run makes one instance, calls :meth:`start` once before the first
    line, :meth:`log` with each line, and :meth:`finish` once when the run ends, also when it
    fails. A subclass imports its tracker's package at the top of its own module: that module
    is imported only when a run chooses the logger.
    """

    def start(self, config: dict[str, Any], output_dir: Path, step: int = 0) -> None:
        """The run begins: ``config`` is every resolved option by its YAML key (as in
        ``OUTPUT/config.yaml``), ``output_dir`` the run folder (it exists), and ``step`` the
        step the run continues from: 0, or the resumed checkpoint's step, after which lines are
        logged again (a tracker that keeps history may drop what it holds past it)."""

    @abstractmethod
    def log(self, record: dict[str, Any]) -> None:
        """One metrics line: ``step`` (int), ``epoch``, then numbers such as ``loss``,
        ``learning_rate``, ``eval_loss``, ``reward`` and ``rewards/NAME``, and a few strings
        (``device``). A value may be ``None`` (not measured) or a non-finite float;
        :func:`numeric_values` picks out what a tracker can plot."""

    def finish(self) -> None:
        """The run ended (finished or failed): flush and close."""


def numeric_values(record: dict[str, Any]) -> dict[str, float]:
    """The plottable values of a metrics line: its finite numbers except ``step``."""
    return {
        key: float(value)
        for key, value in record.items()
        if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    }


def select_loggers(manager, names: tuple[str, ...] | list[str]) -> list:
    """The registered loggers a run with ``--report-to NAMES`` uses, ``jsonl`` first.

    An unknown name, or a logger whose package is missing, is a :class:`ConfigError` saying
    what is installed or what to install: asked before training, not after it.
    """
    registered = manager.collect("logger")
    chosen = [ALWAYS_ON]
    for name in names:
        if name == ALL:
            chosen += [other for other, record in sorted(registered.items()) if not record.spec.missing_modules()]
            continue
        if name == NONE:
            continue
        if name not in registered:
            raise ConfigError(f"--report-to {name}: no logger of that name is installed; {describe_installed(registered)}")
        missing = registered[name].spec.missing_modules()
        if missing:
            raise ConfigError(
                f"--report-to {name}: the {name} logger needs the {' and '.join(missing)} package, which is not installed here; "
                f"pip install {' '.join(missing)}"
            )
        chosen.append(name)
    if ALWAYS_ON not in registered:
        raise ConfigError(f"no {ALWAYS_ON} logger is registered: the tunesmith installation is incomplete; reinstall tunesmith")
    return [registered[name] for name in dict.fromkeys(chosen)]


def describe_installed(registered: dict) -> str:
    """The names ``--report-to`` takes, each unavailable one with what it needs."""
    names = []
    for name, record in sorted(registered.items()):
        if name == ALWAYS_ON:
            continue
        missing = record.spec.missing_modules()
        names.append(f"{name} (needs pip install {' '.join(missing)})" if missing else name)
    return f"installed loggers: {', '.join(names + [ALL]) if names else 'none besides metrics.jsonl'}"


class RunLoggers:
    """The loggers of one run, fed together; empty on every process but the first."""

    def __init__(self, loggers: list[tuple[str, MetricsLogger]], output_dir: Path, write_curves: bool):
        self.loggers = loggers
        self.output_dir = output_dir
        self.write_curves = write_curves

    @contextmanager
    def run(self, config: dict[str, Any], step: int = 0) -> Iterator[RunLoggers]:
        """Start every logger; on leaving, finish each (a failing one is reported, the others
        still finish) and draw ``OUTPUT/curves.png``."""
        started: list[tuple[str, MetricsLogger]] = []
        try:
            for name, logger in self.loggers:
                logger.start(config, self.output_dir, step)
                started.append((name, logger))
            yield self
        finally:
            for name, logger in started:
                try:
                    logger.finish()
                except Exception as error:  # the run's own outcome matters more than a tracker's
                    click.echo(f"warning: the {name} logger failed to finish: {error!r}", err=True)
            if self.write_curves:
                from tunesmith.curves import write_run_curves

                write_run_curves(self.output_dir)

    def log(self, record: dict[str, Any]) -> None:
        for _, logger in self.loggers:
            logger.log(record)


def open_loggers(manager, names: tuple[str, ...] | list[str], output_dir: Path, first_process: bool) -> RunLoggers:
    """The run's loggers, built on the first process only (every other process logs nothing)."""
    if not first_process:
        return RunLoggers([], output_dir, write_curves=False)
    built = []
    for registered in select_loggers(manager, names):
        logger = registered.load()()
        if not isinstance(logger, MetricsLogger):
            raise PluginError(
                f"logger {registered.spec.name!r} from plugin {registered.plugin} (distribution {registered.distribution}) "
                f"is a {type(logger).__name__}, not a tunesmith.MetricsLogger"
            )
        built.append((registered.spec.name, logger))
    return RunLoggers(built, output_dir, write_curves=True)
