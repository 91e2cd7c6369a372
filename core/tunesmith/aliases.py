"""Option names users bring from Hugging Face ``TrainingArguments``, TRL, peft, LLaMA-Factory
and ms-swift, accepted for tunesmith's own.

An alias is read as the option it names, in a ``--config`` YAML file and, where it only renames
(``--per-device-train-batch-size``), as a command-line flag listed beside the option in
``--help``. An alias whose value means something else here (``bf16: true`` is
``precision: bf16``) is converted, in YAML only. Keys of those tools that have no counterpart
here (``do_train``, LLaMA-Factory's ``template``) are listed in :data:`IGNORED_KEYS` and, in a
file written for one of them, skipped with a note rather than refused.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tunesmith.errors import ConfigError


@dataclass(frozen=True)
class OptionAlias:
    """``name`` is read as tunesmith's ``option``; ``convert`` turns its value into the option's
    (None: the same value); ``source`` says whose name it is, for ``--help`` and messages."""

    name: str
    option: str
    source: str
    convert: Callable[[Any], Any] | None = None

    @property
    def renames(self) -> bool:
        """Whether the value is taken as it is (so the alias can be a command-line flag too)."""
        return self.convert is None


def _precision(name: str) -> Callable[[Any], Any]:
    def convert(value: Any) -> Any:
        if value is True:
            return name
        raise ConfigError(f"expected true (train in {name}); leave the key out, or set 'precision', for anything else")

    return convert


def _dora(value: Any) -> Any:
    if isinstance(value, bool):
        return "dora" if value else "lora"
    raise ConfigError(f"expected true or false, got {value!r}")


def _finetuning_type(value: Any) -> Any:
    kinds = {"lora": "lora", "full": "full", "dora": "dora", "qlora": "qlora"}
    if value in kinds:
        return kinds[value]
    raise ConfigError(f"expected one of {', '.join(kinds)} (tunesmith's --adapter), got {value!r}")


def _torch_dtype(value: Any) -> Any:
    dtypes = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "auto": "auto"}
    if value in dtypes:
        return dtypes[value]
    raise ConfigError(f"expected one of {', '.join(dtypes)}, got {value!r}")


def _optimizer(value: Any) -> Any:
    # Transformers' names for the optimizers tunesmith has built in; any other is passed on and
    # must be an installed optimizer plugin's name.
    return {"adamw_torch": "adamw", "adamw_torch_fused": "adamw", "adamw_hf": "adamw"}.get(value, value)


def _target_modules(value: Any) -> Any:
    if value == "all":  # LLaMA-Factory's word for every linear layer
        return "all-linear"
    if isinstance(value, list):
        return ",".join(str(item) for item in value)
    return value


def _whole_epochs(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, float):
        raise ConfigError(f"expected a whole number of epochs, got {value}; set max_steps for part of an epoch")
    return value


OPTION_ALIASES = (
    OptionAlias("model_name_or_path", "model", "TrainingArguments, LLaMA-Factory"),
    OptionAlias("per_device_train_batch_size", "batch_size", "TrainingArguments"),
    OptionAlias("gradient_accumulation_steps", "grad_accum", "TrainingArguments"),
    OptionAlias("num_train_epochs", "epochs", "TrainingArguments", _whole_epochs),
    OptionAlias("resume_from_checkpoint", "resume", "TrainingArguments"),
    OptionAlias("lr_scheduler_type", "lr_scheduler", "TrainingArguments"),
    OptionAlias("optim", "optimizer", "TrainingArguments", _optimizer),
    OptionAlias("max_seq_length", "max_length", "TRL"),
    OptionAlias("cutoff_len", "max_length", "LLaMA-Factory"),
    OptionAlias("val_size", "val_split", "LLaMA-Factory"),
    OptionAlias("lora_r", "lora_rank", "peft"),
    OptionAlias("lora_target", "target_modules", "LLaMA-Factory", _target_modules),
    OptionAlias("bf16", "precision", "TrainingArguments", _precision("bf16")),
    OptionAlias("fp16", "precision", "TrainingArguments", _precision("fp16")),
    OptionAlias("torch_dtype", "precision", "ms-swift", _torch_dtype),
    OptionAlias("use_dora", "adapter", "peft", _dora),
    OptionAlias("finetuning_type", "adapter", "LLaMA-Factory", _finetuning_type),
    OptionAlias("train_type", "adapter", "ms-swift", _finetuning_type),
)
ALIASES_BY_NAME = {alias.name: alias for alias in OPTION_ALIASES}

#: keys of those tools with no counterpart here, and why a run does without them
IGNORED_KEYS = {
    "do_train": "tunesmith's command says what it does",
    "stage": "tunesmith's command (sft, dpo ...) says what it trains",
    "template": "the tokenizer's own chat template is used",
    "overwrite_output_dir": "a run resumes in its output folder; give another --output-dir to start afresh",
    "overwrite_cache": "there is no preprocessing cache",
    "dataset_num_proc": "rows are tokenized in the training process",
    "preprocessing_num_workers": "rows are tokenized in the training process",
    "dataloader_num_workers": "batches are built in the training process",
    "plot_loss": "OUTPUT/curves.png is drawn at the end of every run",
    "logging_dir": "metrics go to OUTPUT/metrics.jsonl, and with report_to: tensorboard to OUTPUT/runs",
    "ddp_timeout": "the process group uses its default timeout",
    "per_device_eval_batch_size": "evaluation uses --batch-size",
    "eval_strategy": "evaluation runs every eval_steps when there is evaluation data",
    "evaluation_strategy": "evaluation runs every eval_steps when there is evaluation data",
    "save_strategy": "checkpoints are written every save_steps",
    "logging_strategy": "metrics are written every logging_steps",
}


def flag_aliases(option: str) -> list[str]:
    """The command-line spellings of the aliases that only rename ``option`` (``--per-device-train-batch-size``)."""
    return ["--" + alias.name.replace("_", "-") for alias in OPTION_ALIASES if alias.option == option and alias.renames]
