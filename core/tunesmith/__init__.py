"""tunesmith: fine-tune, align and serve language models on any hardware, extended by plugins.

This module is the public API a plugin may rely on. Its names are imported when first used
(PEP 562), so ``import tunesmith`` (and an entry-point module importing ``hookimpl`` or a
record type) stays cheap and imports neither torch nor any device backend.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from tunesmith.errors import ConfigError, DataError, PluginError, RewardError, Stopped, TrainingError, TunesmithError
from tunesmith.hooks import hookimpl, hookspec
from tunesmith.records import (
    CommandSpec,
    DeviceCapabilities,
    DeviceSpec,
    GenerationBackendSpec,
    LoggerSpec,
    OptimizerSpec,
    OptionSpec,
    RewardSpec,
    ServingEngineSpec,
    StrategySpec,
    TrainerSpec,
    Unavailable,
)

#: public names defined in modules that import torch, by the module that defines them
_LAZY = {
    "Device": "tunesmith.device",
    "Strategy": "tunesmith.strategy",
    "StepOutcome": "tunesmith.strategy",
    "Trainer": "tunesmith.trainer",
    "TrainerContext": "tunesmith.trainer",
    "LossOutput": "tunesmith.trainer",
    "RowFormat": "tunesmith.data.examples",
    "FieldError": "tunesmith.data.examples",
    "CONVERSATION_FORMATS": "tunesmith.data.examples",
    "PAIRED_PREFERENCE_FORMATS": "tunesmith.data.examples",
    "UNPAIRED_PREFERENCE_FORMATS": "tunesmith.data.examples",
    "PROMPT_FORMATS": "tunesmith.data.examples",
    "Example": "tunesmith.data.types",
    "Sample": "tunesmith.data.types",
    "IGNORE_INDEX": "tunesmith.data.types",
    "tokenize_chat": "tunesmith.data.tokenize",
    "tokenize_text": "tunesmith.data.tokenize",
    "tokenize_prompt_and_responses": "tunesmith.data.tokenize",
    "sequence_logps": "tunesmith.losses",
    "target_logps": "tunesmith.losses",
    "TargetLogps": "tunesmith.losses",
    "sequence_scores": "tunesmith.models",
    "collate_causal": "tunesmith.data.collate",
    "causal_lm_loss": "tunesmith.losses",
    "create_plugin_manager": "tunesmith.plugins",
    "BatchOrder": "tunesmith.data.order",
    "MetricsLog": "tunesmith.metrics",
    "MetricsLogger": "tunesmith.loggers",
    "Completion": "tunesmith.generation",
    "GenerationOptions": "tunesmith.generation",
    "generate_batch": "tunesmith.generation",
    "Step": "tunesmith.steps",
    "StepPlan": "tunesmith.steps",
    "StepSource": "tunesmith.steps",
    "Reward": "tunesmith.rewards",
    "RewardResult": "tunesmith.rewards",
    "RewardRunner": "tunesmith.rewards",
    "check_reward_columns": "tunesmith.rewards",
    "load_rewards": "tunesmith.rewards",
    "parse_reward_option": "tunesmith.rewards",
    "every_process_finished": "tunesmith.generation",
    "GenerationBackend": "tunesmith.generation_backend",
    "ServingEngine": "tunesmith.serving.engine",
    "Job": "tunesmith.serving.engine",
    "ChoicePiece": "tunesmith.serving.engine",
    "QueueFull": "tunesmith.serving.engine",
    "WaitingJobs": "tunesmith.serving.engine",
    "create_generation_backend": "tunesmith.generation_backend",
    "generation_weights": "tunesmith.generation_backend",
    "stop_token_ids": "tunesmith.generation",
    "resolve_model": "tunesmith.models",
    "generate_replies": "tunesmith.batch_inference",
    "write_replies": "tunesmith.batch_inference",
}

if TYPE_CHECKING:
    from tunesmith.batch_inference import generate_replies, write_replies
    from tunesmith.data.collate import collate_causal
    from tunesmith.data.examples import (
        CONVERSATION_FORMATS,
        PAIRED_PREFERENCE_FORMATS,
        PROMPT_FORMATS,
        UNPAIRED_PREFERENCE_FORMATS,
        FieldError,
        RowFormat,
    )
    from tunesmith.data.order import BatchOrder
    from tunesmith.data.tokenize import tokenize_chat, tokenize_prompt_and_responses, tokenize_text
    from tunesmith.data.types import IGNORE_INDEX, Example, Sample
    from tunesmith.device import Device
    from tunesmith.generation import Completion, GenerationOptions, every_process_finished, generate_batch, stop_token_ids
    from tunesmith.generation_backend import GenerationBackend, create_generation_backend, generation_weights
    from tunesmith.loggers import MetricsLogger
    from tunesmith.losses import TargetLogps, causal_lm_loss, sequence_logps, target_logps
    from tunesmith.metrics import MetricsLog
    from tunesmith.models import resolve_model, sequence_scores
    from tunesmith.plugins import create_plugin_manager
    from tunesmith.rewards import Reward, RewardResult, RewardRunner, check_reward_columns, load_rewards, parse_reward_option
    from tunesmith.serving.engine import ChoicePiece, Job, QueueFull, ServingEngine, WaitingJobs
    from tunesmith.steps import Step, StepPlan, StepSource
    from tunesmith.strategy import StepOutcome, Strategy
    from tunesmith.trainer import LossOutput, Trainer, TrainerContext


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tunesmith' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "BatchOrder",
    "MetricsLog",
    "MetricsLogger",
    "LoggerSpec",
    "CONVERSATION_FORMATS",
    "FieldError",
    "PAIRED_PREFERENCE_FORMATS",
    "PROMPT_FORMATS",
    "RowFormat",
    "TrainerContext",
    "UNPAIRED_PREFERENCE_FORMATS",
    "CommandSpec",
    "Completion",
    "ConfigError",
    "DataError",
    "Device",
    "DeviceCapabilities",
    "DeviceSpec",
    "Example",
    "GenerationBackend",
    "GenerationBackendSpec",
    "GenerationOptions",
    "IGNORE_INDEX",
    "LossOutput",
    "OptimizerSpec",
    "OptionSpec",
    "PluginError",
    "Reward",
    "RewardError",
    "RewardResult",
    "RewardRunner",
    "RewardSpec",
    "Sample",
    "ServingEngine",
    "ServingEngineSpec",
    "ChoicePiece",
    "Job",
    "QueueFull",
    "WaitingJobs",
    "Step",
    "StepOutcome",
    "StepPlan",
    "StepSource",
    "Stopped",
    "TargetLogps",
    "Strategy",
    "StrategySpec",
    "Trainer",
    "TrainerSpec",
    "TrainingError",
    "TunesmithError",
    "Unavailable",
    "causal_lm_loss",
    "check_reward_columns",
    "collate_causal",
    "create_generation_backend",
    "create_plugin_manager",
    "every_process_finished",
    "generate_batch",
    "generation_weights",
    "generate_replies",
    "write_replies",
    "hookimpl",
    "hookspec",
    "load_rewards",
    "parse_reward_option",
    "tokenize_chat",
    "tokenize_prompt_and_responses",
    "tokenize_text",
    "sequence_logps",
    "target_logps",
    "sequence_scores",
    "resolve_model",
    "stop_token_ids",
]
