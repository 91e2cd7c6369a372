"""Typed records returned by registration hooks.

Each record is a small frozen dataclass with a validated name: lowercase letters, digits,
``-`` and ``_``, starting with a letter. Classes and callables may be given as a dotted path
``"package.module:attribute"`` so that heavy imports happen only when the plugin is used;
:func:`load_object` resolves them.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from tunesmith.errors import PluginError

NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_-]*$")


def validate_name(kind: str, name: str) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise PluginError(
            f"invalid {kind} name {name!r}: expected lowercase letters, digits, '-' or '_', starting with a letter"
        )
    return name


def load_object(ref: Any) -> Any:
    """Return ``ref`` itself, or import it when it is a ``"module:attribute"`` string."""
    if not isinstance(ref, str):
        return ref
    module_name, _, attribute = ref.partition(":")
    if not attribute:
        raise PluginError(f"{ref!r} is not a dotted path of the form 'package.module:attribute'")
    obj = importlib.import_module(module_name)
    for part in attribute.split("."):
        obj = getattr(obj, part)
    return obj


OPTION_NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class OptionSpec:
    """An option a plugin reads: the flag ``--zero-stage`` and the YAML key ``zero_stage``.

    ``type`` is a click type or a Python type (``int``, ``float``, ``str``); left out, it is
    the default's type. A ``bool`` default makes a ``--name/--no-name`` switch; a tuple
    default a repeatable option (``--reward a --reward b``, a YAML list) whose value is a
    tuple, with ``type`` the type of one value (``str`` when left out and the default is
    empty). The value reaches the plugin in its ``options`` mapping under ``name``.
    """

    name: str
    default: Any
    help: str
    type: Any = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not OPTION_NAME_PATTERN.match(self.name):
            raise PluginError(f"invalid option name {self.name!r}: expected lowercase letters, digits and '_', starting with a letter")

    @property
    def flag(self) -> bool:
        return isinstance(self.default, bool)

    @property
    def repeatable(self) -> bool:
        return isinstance(self.default, tuple)

    @property
    def value_type(self) -> type:
        """The type of one value, from the default."""
        if self.repeatable:
            return type(self.default[0]) if self.default else str
        return type(self.default)


#: the precisions ``--precision`` can name, fastest last
PRECISION_NAMES = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class Unavailable:
    """A device probe's answer when the hardware cannot be used here, with a reason a user can act on.

    It is false, so a probe may return ``True`` or ``Unavailable("torch_npu is not installed")``.
    """

    reason: str

    def __bool__(self) -> bool:
        return False


@dataclass(frozen=True)
class DeviceCapabilities:
    """What a hardware family can do, declared by its plugin and read without importing it.

    - ``precisions``: what ``--precision`` may name on it (the device may offer fewer at run
      time, as CUDA offers bf16 only from compute capability 8.0).
    - ``grad_scaler``: fp16 training with loss scaling works (``torch.amp.GradScaler``).
    - ``distributed_backend``: its torch.distributed backend; ``None`` means one process only.
    - ``strategies``: the strategies it can run; ``None`` means every one its backend allows.
    - ``quantization``: quantised-weight adapters it can train (``"qlora"``).
    - ``memory_stats``: it reports allocated and peak memory.
    """

    precisions: tuple[str, ...] = ("fp32",)
    grad_scaler: bool = False
    distributed_backend: str | None = None
    strategies: tuple[str, ...] | None = None
    quantization: tuple[str, ...] = ()
    memory_stats: bool = False

    def __post_init__(self):
        unknown = [name for name in self.precisions if name not in PRECISION_NAMES]
        if unknown or "fp32" not in self.precisions:
            raise PluginError(f"device precisions {self.precisions!r}: expected fp32 and any of {', '.join(PRECISION_NAMES[1:])}")


@dataclass(frozen=True)
class DeviceSpec:
    """A hardware family: ``device`` is a :class:`tunesmith.device.Device` subclass or its path.

    ``probe`` answers cheaply, without initialising the hardware, whether it is usable here:
    ``True``, or an :class:`Unavailable` with the reason. ``priority`` orders ``--device auto``
    (cpu 0, the fake test device 10, mps 50, cuda and npu 100). ``capabilities`` say what the
    hardware can do, so that an option it cannot honour is refused before any model loads.
    ``options`` are training options only this device understands.
    """

    name: str
    device: Any
    probe: Callable[[], Any]
    priority: int = 0
    description: str = ""
    capabilities: DeviceCapabilities = field(default_factory=DeviceCapabilities)
    #: the device's own :class:`OptionSpec` flags and YAML keys (``--liger``); it receives their values as ``options``
    options: tuple[OptionSpec, ...] = ()

    def __post_init__(self):
        validate_name("device", self.name)

    def load(self):
        return load_object(self.device)


@dataclass(frozen=True)
class StrategySpec:
    """A parallel strategy: ``strategy`` is a :class:`tunesmith.strategy.Strategy` subclass or its path.

    ``distributed`` says it runs several processes (started by a launcher, talking through
    the device's collective backend); a single-process strategy refuses a multi-process job.
    ``options`` are the strategy's own :class:`OptionSpec` flags and YAML keys; the strategy
    receives their values as ``options``.
    """

    name: str
    strategy: Any
    description: str = ""
    distributed: bool = False
    options: tuple[OptionSpec, ...] = ()

    def __post_init__(self):
        validate_name("strategy", self.name)

    def load(self):
        return load_object(self.strategy)


#: the kinds of model a trainer may train (:attr:`TrainerSpec.model_kind`)
MODEL_KINDS = ("causal_lm", "sequence_classification")


@dataclass(frozen=True)
class TrainerSpec:
    """A training objective: ``trainer`` is a :class:`tunesmith.trainer.Trainer` subclass or its path.

    ``row_formats`` are the dataset formats it reads (:class:`tunesmith.RowFormat`; empty means
    the conversation and text formats ``sft`` reads). ``options`` are its own
    :class:`OptionSpec` flags and YAML keys, offered by its command only; it reads their values
    as ``self.options``. ``model_kind`` is the model the engine loads for it: ``causal_lm`` (a
    language-model head) or ``sequence_classification`` (one score per sequence, as a reward model).
    """

    name: str
    trainer: Any
    description: str = ""
    row_formats: tuple[Any, ...] = ()
    options: tuple[OptionSpec, ...] = ()
    model_kind: str = "causal_lm"

    def __post_init__(self):
        validate_name("trainer", self.name)
        if self.model_kind not in MODEL_KINDS:
            raise PluginError(f"trainer {self.name!r}: model_kind {self.model_kind!r}: expected one of {', '.join(MODEL_KINDS)}")

    def load(self):
        return load_object(self.trainer)


@dataclass(frozen=True)
class OptimizerSpec:
    """An optimizer: ``build(param_groups, learning_rate, **options) -> torch.optim.Optimizer``."""

    name: str
    build: Any
    description: str = ""

    def __post_init__(self):
        validate_name("optimizer", self.name)

    def load(self):
        return load_object(self.build)


@dataclass(frozen=True)
class RewardSpec:
    """A reward function ``fn(prompts, completions, **columns) -> list[float | None]``."""

    name: str
    fn: Any
    description: str = ""

    def __post_init__(self):
        validate_name("reward", self.name)

    def load(self):
        return load_object(self.fn)


@dataclass(frozen=True)
class GenerationBackendSpec:
    """What generates a trainer's samples while it trains (GRPO rollouts).

    ``backend`` is a :class:`tunesmith.generation_backend.GenerationBackend` subclass or its
    dotted path, imported only when chosen. ``devices`` names the devices it can run on
    (``("cuda",)``); empty means every device.
    """

    name: str
    backend: Any
    description: str = ""
    devices: tuple[str, ...] = ()

    def __post_init__(self):
        validate_name("generation backend", self.name)
        if isinstance(self.devices, str):
            raise PluginError(f"generation backend {self.name!r}: devices {self.devices!r}: expected a tuple of device names, e.g. ('cuda',)")
        for device in self.devices:
            validate_name("device", device)

    def load(self):
        return load_object(self.backend)


@dataclass(frozen=True)
class ServingEngineSpec:
    """What generates the replies of ``tunesmith serve`` (``--engine NAME``).

    ``engine`` is a :class:`tunesmith.serving.engine.ServingEngine` subclass or its dotted path,
    imported only when chosen. ``devices`` names the devices it can run on (``("cuda",)``);
    empty means every device.
    """

    name: str
    engine: Any
    description: str = ""
    devices: tuple[str, ...] = ()

    def __post_init__(self):
        validate_name("serving engine", self.name)
        if isinstance(self.devices, str):
            raise PluginError(f"serving engine {self.name!r}: devices {self.devices!r}: expected a tuple of device names, e.g. ('cuda',)")
        for device in self.devices:
            validate_name("device", device)

    def load(self):
        return load_object(self.engine)


@dataclass(frozen=True)
class LoggerSpec:
    """An experiment tracker fed every metrics line: ``logger`` is a :class:`tunesmith.loggers.MetricsLogger`
    subclass or its dotted path, imported only when ``--report-to`` chooses it.

    ``requires`` names the top-level modules it imports (``("wandb",)``); while one is missing
    the logger is listed but refused with the ``pip install`` that would fix it, and
    ``--report-to all`` leaves it out.
    """

    name: str
    logger: Any
    description: str = ""
    requires: tuple[str, ...] = ()

    def __post_init__(self):
        validate_name("logger", self.name)
        if isinstance(self.requires, str):
            raise PluginError(f"logger {self.name!r}: requires {self.requires!r}: expected a tuple of module names, e.g. ('wandb',)")

    def missing_modules(self) -> list[str]:
        """The required modules that cannot be imported here (looked up, not imported)."""
        return [module for module in self.requires if importlib.util.find_spec(module) is None]

    def load(self):
        return load_object(self.logger)


@dataclass(frozen=True)
class CommandSpec:
    """A ``tunesmith NAME`` command: ``command`` is a click command or its dotted path.

    Given as a path, the command's module is imported only when the command runs or shows its
    own help, so ``tunesmith --help`` lists it by ``description`` without importing it.
    """

    name: str
    command: Any
    description: str = ""

    def __post_init__(self):
        validate_name("command", self.name)
        if not isinstance(self.command, str):
            import click

            if not isinstance(self.command, click.Command):
                raise PluginError(
                    f"command {self.name!r}: {self.command!r} is neither a click command nor a dotted path "
                    "'package.module:command'"
                )

    def load(self):
        import click

        command = load_object(self.command)
        if not isinstance(command, click.Command):
            raise PluginError(f"command {self.name!r}: {self.command!r} is {command!r}, not a click command (decorate it with @click.command)")
        return command


@dataclass(frozen=True)
class Registered:
    """A record together with the plugin and distribution that registered it."""

    spec: Any
    plugin: str
    distribution: str
    version: str

    def load(self) -> Any:
        """The record's class or function, imported now; an import failure names the plugin."""
        try:
            return self.spec.load()
        except Exception as error:
            raise PluginError(
                f"{self.spec.name!r} from plugin {self.plugin} (distribution {self.distribution}) "
                f"could not be imported: {error!r}"
            ) from error


@dataclass(frozen=True)
class DeviceCandidate:
    """A registered device and whether its probe found the hardware."""

    registered: Registered
    available: bool
    #: why it is unavailable: the probe's :class:`Unavailable` reason, or the error the probe raised
    reason: str | None = None

    @property
    def name(self) -> str:
        return self.registered.spec.name

    @property
    def priority(self) -> int:
        return self.registered.spec.priority


@dataclass(frozen=True)
class DeviceChoice:
    """The outcome of device selection, with a sentence saying why."""

    candidate: DeviceCandidate
    reason: str
    candidates: list[DeviceCandidate] = field(default_factory=list)
