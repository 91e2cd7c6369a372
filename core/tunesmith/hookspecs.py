"""Hook specifications: the contract between tunesmith and its plugins.

Every plugin is a module (or object) exposing functions named like these specs and decorated
with :data:`tunesmith.hookimpl`. A distribution makes its module discoverable by declaring an
entry point in the ``tunesmith`` group of its ``pyproject.toml``::

    [project.entry-points.tunesmith]
    my_rewards = "my_package.plugin"

Registration hooks are collect-all: every plugin contributes records (see
:mod:`tunesmith.records`), either returned as a list or yielded. Returning ``None`` or an empty
list contributes nothing. Names must be unique across all installed plugins.

An implementation may accept fewer arguments than its spec; specs only ever grow.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

from tunesmith.hooks import hookspec

if TYPE_CHECKING:
    from tunesmith.records import (
        CommandSpec,
        DeviceCandidate,
        DeviceChoice,
        DeviceSpec,
        GenerationBackendSpec,
        LoggerSpec,
        OptimizerSpec,
        RewardSpec,
        ServingEngineSpec,
        StrategySpec,
        TrainerSpec,
    )


@hookspec
def tunesmith_register_devices() -> Iterable[DeviceSpec] | None:
    """Register hardware families this plugin can drive.

    Called once per plugin manager (each process builds its own). Return :class:`DeviceSpec`
    records. The ``device`` class is given as a dotted path ``"package.module:Class"`` so that
    heavy imports (``torch_npu``) happen only when the device is chosen; ``probe`` must be
    cheap and must not initialise the hardware.

    Example::

        @hookimpl
        def tunesmith_register_devices():
            return [DeviceSpec(name="npu", device="tunesmith_npu.device:NPUDevice",
                               probe=npu_is_available, priority=100)]
    """


@hookspec
def tunesmith_register_strategies() -> Iterable[StrategySpec] | None:
    """Register parallel strategies (how the model is replicated or sharded).

    Return :class:`StrategySpec` records; the strategy class (a
    :class:`tunesmith.strategy.Strategy` subclass) is a dotted path or a class. Set
    ``distributed=True`` for a strategy that runs several processes. The built-in ``single``
    strategy trains in one process on one device, ``ddp`` in several.

    Example::

        @hookimpl
        def tunesmith_register_strategies():
            return [StrategySpec(name="my-parallel", strategy="my_package.strategy:MyStrategy",
                                 distributed=True)]
    """


@hookspec
def tunesmith_register_trainers() -> Iterable[TrainerSpec] | None:
    """Register training objectives (``sft``, ``pt``, ``dpo`` ...).

    Return :class:`TrainerSpec` records. A trainer is an objective plus its data format (see
    :class:`tunesmith.trainer.Trainer`); it never runs the loop itself. Each registered
    trainer becomes a ``tunesmith NAME`` command.
    """


@hookspec
def tunesmith_register_optimizers() -> Iterable[OptimizerSpec] | None:
    """Register optimizers selectable with ``--optimizer NAME``.

    Return :class:`OptimizerSpec` records whose ``build`` callable receives parameter groups
    already split by the core (no weight decay on norms, biases and embeddings) and returns a
    ``torch.optim.Optimizer``.
    """


@hookspec
def tunesmith_register_rewards() -> Iterable[RewardSpec] | None:
    """Register reward functions for reinforcement-learning trainers.

    Return :class:`RewardSpec` records; ``--reward NAME`` then chooses one. A reward function
    is called as ``fn(prompts, completions, **dataset_columns)`` and returns one ``float`` per
    completion, or ``None`` for one it cannot score. Completions are strings, or lists of
    messages for conversational prompts; each dataset column is a list aligned with them. A
    keyword parameter without a default is a column the reward needs (checked before
    training). ``fn`` may be a ``"module:function"`` path, imported only when chosen::

        @hookimpl
        def tunesmith_register_rewards():
            return [RewardSpec(name="brevity", fn="my_rewards.scoring:brevity", description="prefers short answers")]
    """


@hookspec
def tunesmith_register_generation_backends() -> Iterable[GenerationBackendSpec] | None:
    """Register generation backends: what generates completions while a trainer trains.

    Return :class:`GenerationBackendSpec` records. The backend class (a
    :class:`tunesmith.generation_backend.GenerationBackend` subclass) is given as a dotted path
    so that a heavy engine (vLLM) is imported only when chosen; ``devices`` lists the devices it
    runs on. The built-in ``transformers`` backend runs everywhere, on the training model itself.

    Example::

        @hookimpl
        def tunesmith_register_generation_backends():
            if importlib.util.find_spec("my_engine") is None:
                return None  # the engine is not installed: nothing to offer
            return [GenerationBackendSpec(name="my-engine", backend="my_package.backend:MyBackend",
                                          devices=("cuda",))]
    """


@hookspec
def tunesmith_register_serving_engines() -> Iterable[ServingEngineSpec] | None:
    """Register serving engines: what generates the replies of ``tunesmith serve --engine NAME``.

    Return :class:`ServingEngineSpec` records. The engine class (a
    :class:`tunesmith.serving.engine.ServingEngine` subclass) is given as a dotted path so that
    a heavy engine (vLLM) is imported only when chosen; ``devices`` lists the devices it runs
    on. The built-in ``transformers`` engine batches requests continuously on every device.

    Example::

        @hookimpl
        def tunesmith_register_serving_engines():
            if importlib.util.find_spec("my_engine") is None:
                return None  # the engine is not installed: nothing to offer
            return [ServingEngineSpec(name="my-engine", engine="my_package.serving:MyEngine", devices=("cuda",))]
    """


@hookspec
def tunesmith_register_loggers() -> Iterable[LoggerSpec] | None:
    """Register experiment trackers that ``--report-to NAME`` sends a run's metrics to.

    Return :class:`LoggerSpec` records. The logger class (a
    :class:`tunesmith.loggers.MetricsLogger` subclass) is given as a dotted path so that the
    tracker's package is imported only when a run chooses it; ``requires`` names the modules
    it needs, so a missing package is reported before training instead of after it. Only the
    first process of a run builds loggers: it calls ``start`` once with the resolved options,
    ``log`` with every line it writes to ``metrics.jsonl``, and ``finish`` when the run ends,
    whether or not it succeeded. ``metrics.jsonl`` itself is the built-in ``jsonl`` logger,
    always on.

    Example::

        @hookimpl
        def tunesmith_register_loggers():
            return [LoggerSpec(name="my-tracker", logger="my_package.tracker:MyTrackerLogger",
                               description="sends metrics to My Tracker", requires=("my_tracker",))]
    """


@hookspec
def tunesmith_register_commands() -> Iterable[CommandSpec] | None:
    """Register ``tunesmith`` sub-commands.

    Return :class:`CommandSpec` records; each becomes ``tunesmith NAME``. Give the click
    command as a dotted path so that ``tunesmith --help`` lists it (by its ``description``)
    without importing its module. A name already taken by a built-in command or a trainer is
    an error naming both. tunesmith's own ``serve`` command registers this way.

    Example::

        @hookimpl
        def tunesmith_register_commands():
            return [CommandSpec(name="quantize", command="my_package.cli:quantize_command",
                                description="quantize a model to 4 bits")]
    """


@hookspec(firstresult=True)
def tunesmith_select_device(requested: str, candidates: list[DeviceCandidate]) -> DeviceChoice | DeviceCandidate | None:
    """Choose the device to run on.

    ``requested`` is the value of ``--device`` (``"auto"`` or a name); ``candidates`` lists
    every registered device with its probe result, highest priority first. The first
    implementation returning a :class:`DeviceChoice` (or a bare candidate, which is wrapped
    in one) decides; return ``None`` to let the next one decide.
    The built-in policy runs last: an explicit name must exist and be available, ``auto``
    takes the highest-priority available device and refuses a tie.
    """
