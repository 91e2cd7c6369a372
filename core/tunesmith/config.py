"""Training options: one definition gives the CLI flag (``--learning-rate``), the YAML key
(``learning_rate``; ``learning-rate`` works too), the default, the help text and the validation.

Values are resolved as defaults < ``--config FILE`` < flags given on the command line. Other
tools' names for the same options are accepted too (:mod:`tunesmith.aliases`). An unknown YAML
key or a bad value is a :class:`~tunesmith.errors.ConfigError` naming the file, the key and
what would be valid; an unknown key also gets the likeliest intended one.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import yaml

from tunesmith.aliases import ALIASES_BY_NAME, IGNORED_KEYS, flag_aliases
from tunesmith.errors import ConfigError, PluginError
from tunesmith.models import ALIASES
from tunesmith.records import OptionSpec


def option(default: Any, help: str, type: Any = None, multiple: bool = False, flag: bool = False) -> Any:
    metadata = {"help": help, "type": type, "multiple": multiple, "flag": flag}
    if multiple:
        return field(default_factory=lambda: tuple(default), metadata=metadata)
    return field(default=default, metadata=metadata)


class ProcessCount(click.ParamType):
    """A number of processes (at least 1), or ``auto``."""

    name = "N|auto"

    def convert(self, value, param, ctx):
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            return str(value)
        if isinstance(value, str) and (value == "auto" or (value.isdigit() and int(value) >= 1)):
            return value
        self.fail(f"expected a whole number of processes (at least 1) or auto, got {value!r}", param, ctx)


POSITIVE = click.IntRange(min=1)
NON_NEGATIVE = click.IntRange(min=0)
FRACTION = click.FloatRange(min=0.0, max=1.0, max_open=True)


@dataclass
class TrainConfig:
    # model
    model: str = option("smollm2-135m", "Local Hugging Face model folder, a Hub ID (ORG/NAME), or the built-in alias smollm2-135m.")
    hub: str = option(
        "huggingface", "Where ORG/NAME model and dataset IDs come from: the Hugging Face Hub, or ModelScope (needs the modelscope package).",
        click.Choice(["huggingface", "modelscope"]),
    )
    trust_remote_code: bool = option(False, "Allow the model folder's own Python code to run.", flag=True)
    adapter: str = option(
        "lora",
        "What to train: a LoRA or DoRA adapter (peft), LoRA on 4-bit quantised weights (qlora, where the device offers it), or every weight.",
        click.Choice(["lora", "dora", "qlora", "full"]),
    )
    lora_rank: int = option(8, "LoRA rank r.", POSITIVE)
    lora_alpha: int = option(16, "LoRA alpha (scaling = alpha / rank).", POSITIVE)
    lora_dropout: float = option(0.05, "Dropout on the LoRA input.", FRACTION)
    target_modules: str = option("all-linear", "Comma-separated module names to adapt, or all-linear.")
    gradient_checkpointing: bool = option(
        False, "Recompute each layer's activations in backward instead of keeping them: far less activation memory for one more forward pass per step (typically a quarter to a third more time).", flag=True,
    )
    release_memory: bool = option(
        True, "Hand each freed block of 1 MiB or more back to the system at once (glibc's malloc), so the resident size stays near "
        "what is live; measured on 2 CPU cores (LoRA SFT, 120 chats): peak 3.8 GB resident instead of 4.7 GB, 15-25% more time. "
        "--no-release-memory for speed where memory is plenty.", flag=True,
    )
    low_memory: bool = option(
        False, "Lowest peak memory at a speed cost: turns on --gradient-checkpointing (one more forward pass per step) and "
        "--release-memory; measured on 2 CPU cores: peak 1.9 GB resident instead of 3.8 GB, twice the time.", flag=True,
    )
    compile: bool = option(
        False, "Compile the model with torch.compile. Not worth it on CPUs: measured on 2 cores (SmolLM2-135M, LoRA, bf16, rows of "
        "512), the first step spent 3 minutes compiling and each new batch shape 4 more, and compiled steps ran no faster; "
        "on GPUs it usually helps.", flag=True,
    )
    # data
    dataset: tuple = option((), "Training data file or folder; repeat to mix; PATH#N or PATH#0.5 samples rows.", multiple=True)
    eval_dataset: tuple = option((), "Evaluation data file or folder; repeatable.", multiple=True)
    val_split: float = option(0.0, "Fraction of the training rows held out for evaluation.", FRACTION)
    eval_steps: int = option(50, "Evaluate every N optimizer steps (when there is eval data).", POSITIVE)
    max_length: int = option(1024, "Truncate samples to this many tokens (and the packed row length).", POSITIVE)
    packing: bool = option(False, "Pack samples into rows of --max-length; attention never crosses samples.", flag=True)
    group_by_length: bool = option(
        True, "Without --packing, put samples of similar length in the same micro-batch (less padding); the micro-batches "
        "still come in a seeded random order.", flag=True,
    )
    skip_bad_rows: bool = option(False, "Skip and count malformed rows instead of failing.", flag=True)
    # optimisation
    output_dir: str = option("output", "Run folder: config.yaml, metrics.jsonl, checkpoint-N/, final/.")
    batch_size: int = option(4, "Rows per micro-batch.", POSITIVE)
    grad_accum: int = option(1, "Micro-batches per optimizer step.", POSITIVE)
    epochs: int = option(1, "Passes over the training data (ignored when --max-steps is set).", POSITIVE)
    max_steps: int = option(0, "Optimizer steps to run; 0 derives them from --epochs.", NON_NEGATIVE)
    learning_rate: float = option(1e-4, "Peak learning rate.", click.FloatRange(min=0.0, min_open=True))
    weight_decay: float = option(0.0, "Decoupled weight decay (never on norms, biases or embeddings).", click.FloatRange(min=0.0))
    optimizer: str = option("adamw", "Optimizer plugin name (see `tunesmith plugins`).")
    lr_scheduler: str = option("cosine", "Learning-rate schedule after warm-up.", click.Choice(["constant", "linear", "cosine"]))
    warmup_steps: int = option(0, "Linear warm-up steps (overrides --warmup-ratio when > 0).", NON_NEGATIVE)
    warmup_ratio: float = option(0.0, "Warm-up as a fraction of all steps.", FRACTION)
    max_grad_norm: float = option(1.0, "Clip the gradient norm to this value; 0 disables clipping.", click.FloatRange(min=0.0))
    precision: str = option("auto", "Compute precision; auto picks what the device computes natively.", click.Choice(["auto", "fp32", "bf16", "fp16"]))
    seed: int = option(42, "Random seed for initialisation, data order and dropout.", NON_NEGATIVE)
    max_bad_steps: int = option(5, "Stop after this many non-finite steps in a row.", POSITIVE)
    # hardware
    device: str = option("auto", "Device plugin name, or auto for the highest-priority available device.")
    strategy: str = option("single", "Parallel strategy plugin name: single, or ddp for several processes (see `tunesmith plugins`).")
    nproc_per_node: str = option("1", "Processes on this machine: a number, or auto for one per device of the chosen device.", ProcessCount())
    nnodes: int = option(1, "Machines in the job; each runs the same command with its own --node-rank.", POSITIVE)
    node_rank: int = option(0, "This machine's index among the --nnodes machines.", NON_NEGATIVE)
    master_addr: str = option("127.0.0.1", "Address of the machine with --node-rank 0 (several machines).")
    master_port: int = option(0, "Port on the --master-addr machine; 0 picks a free port (one machine only).", click.IntRange(0, 65535))
    # logging and checkpoints
    logging_steps: int = option(1, "Write a metrics line every N steps.", POSITIVE)
    report_to: tuple = option(
        (), "Also send the metrics to this tracker: tensorboard, wandb, mlflow, trackio, a plugin's logger, all installed ones, or none; repeatable "
        "(OUTPUT/metrics.jsonl is always written).", multiple=True,
    )
    save_steps: int = option(100, "Write a checkpoint every N steps; 0 writes only the final result.", NON_NEGATIVE)
    save_total_limit: int = option(0, "Keep at most N checkpoints (the newest is never deleted); 0 keeps all.", NON_NEGATIVE)
    resume: str = option("auto", "auto: continue from the newest complete checkpoint; never; or a checkpoint folder.")

    #: values of the options plugins declare (``zero_stage`` ...), by name
    plugin_options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Every option by its YAML key, plugins' own included."""
        values = {key: list(value) if isinstance(value, tuple) else value for key, value in dataclasses.asdict(self).items()}
        values.update({key: list(value) if isinstance(value, tuple) else value for key, value in values.pop("plugin_options").items()})
        return values


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig) if "help" in f.metadata}

@dataclass(frozen=True)
class PluginOption:
    """An option declared by a plugin (``kind`` ``strategy``, ``owner`` ``deepspeed``)."""

    kind: str
    owner: str
    spec: OptionSpec


def collect_plugin_options(manager, trainer: str | None = None) -> dict[str, PluginOption]:
    """Every option the installed strategies and devices declare, and ``trainer``'s own, by name.

    A name taken twice is an error naming both.
    """
    found: dict[str, PluginOption] = {}
    owners = [("strategy", owner, registered) for owner, registered in manager.collect("strategy").items()]
    owners += [("device", owner, registered) for owner, registered in manager.collect("device").items()]
    if trainer is not None:
        owners.append(("trainer", trainer, manager.get("trainer", trainer)))
    for kind, owner, registered in owners:
        for spec in registered.spec.options:
            if spec.name in FIELDS:
                raise PluginError(f"{kind} {owner!r} (distribution {registered.distribution}) declares option {spec.name!r}, which is tunesmith's own")
            if spec.name in found:
                taken = found[spec.name]
                raise PluginError(f"option {spec.name!r} is declared by {taken.kind} {taken.owner!r} and by {kind} {owner!r}")
            found[spec.name] = PluginOption(kind, owner, spec)
    return found


def flag_name(key: str) -> str:
    return "--" + key.replace("_", "-")


def option_definitions(plugin_options: dict[str, PluginOption]) -> dict[str, tuple[Any, dict[str, Any]]]:
    """``(default, metadata)`` of every option, tunesmith's own then the plugins', by name."""
    definitions = {}
    for f in FIELDS.values():
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        definitions[f.name] = (default, f.metadata)
    for name, declared in plugin_options.items():
        spec = declared.spec
        meta = {
            "help": f"{spec.help} (option of {declared.kind} {declared.owner})",
            "type": spec.type or (None if spec.flag else spec.value_type),
            "multiple": spec.repeatable,
            "flag": spec.flag,
        }
        definitions[name] = (spec.default, meta)
    return definitions


def click_options(command, plugin_options: dict[str, PluginOption] | None = None):
    """Decorate a click command with one option per :class:`TrainConfig` field and plugin option, plus ``--config``."""
    for name, (default, meta) in reversed(list(option_definitions(plugin_options or {}).items())):
        if meta["flag"]:
            # --packing/--no-packing rather than a bare switch, so --help can show the default.
            switch = f"{flag_name(name)}/--no-{name.replace('_', '-')}"
            decorator = click.option(switch, name, default=default, help=meta["help"], show_default=True)
        else:
            decorator = click.option(
                flag_name(name),
                *(flag_aliases(name) if name in FIELDS else ()),
                name,
                type=meta["type"],
                default=default,
                multiple=meta["multiple"],
                help=meta["help"],
                show_default="none" if meta["multiple"] and not default else True,
            )
        command = decorator(command)
    return click.option(
        "--config",
        "config_file",
        type=click.Path(dir_okay=False, path_type=Path),
        help="YAML file of options (keys like learning_rate or learning-rate); flags override it.",
    )(command)


def resolve_config(
    ctx: click.Context, values: dict[str, Any], config_file: Path | None, plugin_options: dict[str, PluginOption] | None = None
) -> TrainConfig:
    """Merge defaults, the YAML file and command-line flags into a validated :class:`TrainConfig`."""
    plugin_options = plugin_options or {}
    definitions = option_definitions(plugin_options)
    resolved = dict(values)
    if config_file is not None:
        for key, raw in load_config_file(config_file, definitions).items():
            if ctx.get_parameter_source(key) == click.core.ParameterSource.COMMANDLINE:
                continue
            resolved[key] = cast_value(ctx, config_file, key, raw, definitions[key][1])
    config = TrainConfig(**{key: value for key, value in resolved.items() if key not in plugin_options})
    config.plugin_options = {key: resolved[key] for key in plugin_options if key in resolved}
    for key, declared in plugin_options.items():
        if declared.kind == "strategy" and declared.owner != config.strategy and config.plugin_options.get(key, declared.spec.default) != declared.spec.default:
            raise ConfigError(f"{flag_name(key)} is an option of strategy {declared.owner}; this run uses --strategy {config.strategy}")
    if not config.dataset:
        raise ConfigError("no training data: pass --dataset PATH (or a dataset key in --config)")
    for key, value in config.to_dict().items():
        if isinstance(value, float) and math.isnan(value):
            raise ConfigError(f"{flag_name(key)}: expected a number, got nan")
    if config.node_rank >= config.nnodes:
        raise ConfigError(f"--node-rank {config.node_rank}: expected a machine index below --nnodes {config.nnodes}")
    if config.nnodes > 1 and config.master_port == 0:
        raise ConfigError(f"--nnodes {config.nnodes}: several machines meet at --master-addr and an agreed --master-port; give --master-port")
    if config.eval_dataset and config.val_split > 0:
        raise ConfigError("--eval-dataset and --val-split both choose evaluation data; give one of them")
    if config.model not in ALIASES and Path(config.model).expanduser().is_dir():
        # Recorded in OUTPUT/config.yaml, where infer and export find it from any directory.
        config.model = str(Path(config.model).expanduser().resolve())
    return config


def load_config_file(path: Path, definitions: dict[str, Any]) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"--config {path}: not valid YAML ({error})") from error
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of option names to values, got {type(data).__name__}")
    options: dict[str, Any] = {}
    spellings: dict[str, Any] = {}
    ignored: list[str] = []
    names = {key: key.replace("-", "_") if isinstance(key, str) else key for key in data}
    # A file written for TRL, LLaMA-Factory or ms-swift: keys that mean nothing here are skipped
    # with a note, where a tunesmith file with such a key is refused (most likely a typo).
    foreign = any(name not in definitions and (name in ALIASES_BY_NAME or name in IGNORED_KEYS) for name in names.values())
    for key, value in data.items():
        # Keys are written like the flags (learning-rate) as often as like the fields (learning_rate).
        name = names[key]
        if name not in definitions and name in ALIASES_BY_NAME:
            alias = ALIASES_BY_NAME[name]
            if alias.convert is not None:
                try:
                    value = alias.convert(value)
                except ConfigError as error:
                    raise ConfigError(f"{path}: key {key!r} ({alias.source}'s name for {alias.option!r}): {error}") from None
            name = alias.option
        elif name not in definitions:
            if name in IGNORED_KEYS:
                ignored.append(f"{key} ({IGNORED_KEYS[name]})")
                continue
            if foreign:
                ignored.append(f"{key} (no such option here{_suggestion(name, definitions)})")
                continue
            raise ConfigError(f"{path}: unknown key {key!r}{_suggestion(name, definitions)}; valid keys: {', '.join(definitions)}")
        if name in spellings:
            raise ConfigError(f"{path}: keys {spellings[name]!r} and {key!r} are the same option; keep one")
        spellings[name] = key
        options[name] = value
    if ignored:
        click.echo(f"--config {path}: ignored keys: {'; '.join(ignored)}", err=True)
    return options


def _suggestion(key: Any, definitions: dict[str, Any]) -> str:
    """What the user probably meant by an unknown key, as a parenthesis; "" without a good guess.

    The closest of tunesmith's names and the other tools' names it accepts, so that a TRL user's
    near miss is pointed at the TrainingArguments name they meant to write.
    """
    close = difflib.get_close_matches(str(key), [*definitions, *ALIASES_BY_NAME], n=1)
    if not close:
        return ""
    if close[0] in definitions:
        return f" (did you mean {close[0]!r}?)"
    alias = ALIASES_BY_NAME[close[0]]
    return f" (did you mean {close[0]!r}, {alias.source}'s name for {alias.option!r}?)"


def cast_value(ctx: click.Context, path: Path, key: str, raw: Any, meta: dict[str, Any]) -> Any:
    param = next(p for p in ctx.command.params if p.name == key)
    if raw is None:
        raise ConfigError(f"{path}: key {key!r}: expected a value, got nothing (null)")
    if meta["multiple"] and not isinstance(raw, list):
        raw = [raw]
    if meta["multiple"] and any(item is None for item in raw):
        raise ConfigError(f"{path}: key {key!r}: expected a list of values, got an empty (null) entry")
    if not meta["multiple"] and isinstance(raw, (list, dict)):
        raise ConfigError(f"{path}: key {key!r}: expected a single value, got {type(raw).__name__} {raw!r}")
    if meta["flag"] != isinstance(raw, bool):
        expected = "true or false" if meta["flag"] else "a value that is not true/false"
        raise ConfigError(f"{path}: key {key!r}: expected {expected}, got {raw!r}")
    if isinstance(raw, float) and math.isnan(raw):
        raise ConfigError(f"{path}: key {key!r}: expected a number, got nan")
    if isinstance(param.type, click.types.IntParamType) and isinstance(raw, float) and not raw.is_integer():
        raise ConfigError(f"{path}: key {key!r}: expected a whole number, got {raw!r}")
    try:
        return param.type_cast_value(ctx, raw)
    except click.BadParameter as error:
        raise ConfigError(f"{path}: key {key!r}: {error.message}") from error


def write_config(config: TrainConfig, path: Path) -> None:
    """Write the resolved options as YAML that ``--config`` accepts again."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False), encoding="utf-8")
    temporary.replace(path)
