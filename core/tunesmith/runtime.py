"""What a command decides before it touches data or weights, in every process alike.

:func:`select_runtime` picks the device and precision for every command. :func:`plan_training`
adds, for a training run, the strategy and the process count, resolves the model folder and
the checkpoint to resume, and refuses what cannot work: a strategy the device cannot run, a
multi-process job under a single-process strategy, a distributed strategy on a device without
a collective backend, a checkpoint from another run, a ``--report-to`` logger that is not installed. The ``tunesmith`` command plans once
before it starts any process, so those mistakes cost seconds; every process then plans again
for itself (each builds its own plugin manager) and the engine checks that all agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import click

from tunesmith.checkpoint import find_resume_checkpoint
from tunesmith.device import Device
from tunesmith.errors import ConfigError
from tunesmith.launch import LaunchOptions, ProcessEnvironment
from tunesmith.loggers import select_loggers
from tunesmith.models import resolve_model
from tunesmith.plugins import PluginManager, build_device
from tunesmith.records import Registered
from tunesmith.resume import check_identity, run_identity

if TYPE_CHECKING:
    from tunesmith.config import TrainConfig


@dataclass
class TrainingPlan:
    trainer_name: str
    config: TrainConfig
    device: Device
    device_reason: str
    precision: str
    strategy: Registered
    environment: ProcessEnvironment
    launch: LaunchOptions
    world_size: int
    model_path: Path
    resume_from: Path | None
    identity: dict

    @property
    def needs_launch(self) -> bool:
        """True in the command a user typed with several processes: it must start them."""
        return not self.environment.launched and self.world_size > 1

    @property
    def global_batch(self) -> int:
        return self.identity["global_batch"]


@dataclass(frozen=True)
class Runtime:
    """The device and precision a command runs with, and why that device."""

    device: Device
    device_reason: str
    precision: str

    def describe(self) -> str:
        return f"device: {self.device.describe()}, {self.device_reason}; precision: {self.precision}"


def select_runtime(
    manager: PluginManager, device: str = "auto", precision: str = "auto", training: bool = False, option_values: dict | None = None
) -> Runtime:
    """The device ``--device`` names (or the best available) and the precision ``--precision`` means on it.

    Every command builds its runtime here, so an option the device cannot honour is refused
    the same way everywhere, before any model loads.
    """
    choice = manager.select_device(device)
    built = build_device(choice.candidate.registered, option_values)
    built.check_options()
    return Runtime(built, choice.reason, built.resolve_precision(precision, training=training))


def plan_training(trainer_name: str, config: TrainConfig, manager: PluginManager, environment: ProcessEnvironment | None = None) -> TrainingPlan:
    environment = environment or ProcessEnvironment.from_environ()
    manager.get("trainer", trainer_name)
    runtime = select_runtime(manager, config.device, config.precision, training=True, option_values=config.plugin_options)
    device, precision = runtime.device, runtime.precision
    strategy = manager.get("strategy", config.strategy)
    check_device_runs(device, config.strategy, strategy)
    check_adapter_fits(device, config.adapter, strategy)

    nproc_per_node = process_count(config.nproc_per_node, device, environment)
    world_size = environment.world_size if environment.launched else nproc_per_node * config.nnodes
    if world_size > 1 and not strategy.spec.distributed:
        fitting = sorted(name for name, registered in manager.collect("strategy").items() if registered.spec.distributed)
        raise ConfigError(
            f"--strategy {config.strategy} runs one process, but this job has {world_size}; "
            f"choose a multi-process strategy: {', '.join(fitting) or 'none is installed'}"
        )

    select_loggers(manager, config.report_to)
    strategy_class = strategy.load()
    options = strategy_options(strategy, config)
    strategy_class.check_runnable(device, precision, options)
    global_batch = config.batch_size * config.grad_accum * world_size
    identity = run_identity(trainer_name, config, global_batch, strategy_class.checkpoint_format, world_size)
    # The first process names (and moves aside) a damaged checkpoint; the others only skip it.
    report = warn if environment.rank == 0 else None
    resume_from = find_resume_checkpoint(Path(config.output_dir), config.resume, report)
    if resume_from is not None:
        check_identity(resume_from, identity, config.strategy, strategy_class.reshards_checkpoints(options))
    launch = LaunchOptions(nproc_per_node, config.nnodes, config.node_rank, config.master_addr, config.master_port)
    return TrainingPlan(
        trainer_name, config, device, runtime.device_reason, precision, strategy, environment, launch, world_size,
        resolve_model(config.model, config.hub), resume_from, identity,
    )


def check_device_runs(device: Device, name: str, strategy: Registered) -> None:
    """Refuse a strategy the device cannot run, saying why and what it can run."""
    allowed = device.capabilities.strategies
    if allowed is not None and name not in allowed:
        raise ConfigError(f"--strategy {name}: device {device.name!r} runs only {', '.join(allowed)}")
    if strategy.spec.distributed and not device.distributed_backend:
        raise ConfigError(
            f"--strategy {name} needs collectives between processes, and device {device.name!r} has no "
            "collective backend (it runs one process); use --strategy single"
        )


#: strategies that keep every weight whole on each process, as 4-bit quantised weights need
QUANTISED_STRATEGIES = ("single", "ddp")


def check_adapter_fits(device: Device, adapter: str, strategy: Registered) -> None:
    """Refuse a quantised adapter the device cannot train, or a strategy that would shard its weights."""
    if adapter != "qlora":
        return
    if adapter not in device.capabilities.quantization:
        raise ConfigError(
            f"--adapter qlora: device {device.name!r} cannot train on quantised weights; QLoRA needs a device that "
            "declares it (tunesmith devices lists them: CUDA with bitsandbytes); use --adapter lora"
        )
    if strategy.spec.name not in QUANTISED_STRATEGIES:
        raise ConfigError(f"--adapter qlora runs with --strategy {' or '.join(QUANTISED_STRATEGIES)}, not {strategy.spec.name}")
    device.quantization_config(adapter)  # a missing quantisation package is named now, not after loading


def process_count(requested: str, device: Device, environment: ProcessEnvironment) -> int:
    """Processes on this machine: ``--nproc-per-node`` (``auto`` is the device count), or what the launcher started."""
    if environment.launched:
        if requested not in ("1", "auto") and int(requested) != environment.local_world_size:
            raise ConfigError(
                f"--nproc-per-node {requested}: the launcher already started {environment.local_world_size} process(es) "
                "on this machine; leave the option out when a launcher starts the processes"
            )
        return environment.local_world_size
    return device.device_count() if requested == "auto" else int(requested)


def strategy_options(strategy: Registered, config: TrainConfig) -> dict:
    """The values of the options the chosen strategy declares."""
    return {spec.name: config.plugin_options.get(spec.name, spec.default) for spec in strategy.spec.options}


def warn(message: str) -> None:
    click.echo(f"warning: {message}", err=True)
