"""tunesmith: fine-tune, align and serve language models on any hardware, extended by plugins."""

from tunesmith.device import Device
from tunesmith.errors import ConfigError, DataError, PluginError, TrainingError, TunesmithError
from tunesmith.hooks import hookimpl, hookspec
from tunesmith.plugins import create_plugin_manager
from tunesmith.records import DeviceSpec, OptimizerSpec, OptionSpec, RewardSpec, StrategySpec, TrainerSpec
from tunesmith.strategy import Strategy
from tunesmith.trainer import LossOutput, Trainer

__all__ = [
    "ConfigError",
    "DataError",
    "Device",
    "DeviceSpec",
    "LossOutput",
    "OptimizerSpec",
    "OptionSpec",
    "PluginError",
    "RewardSpec",
    "Strategy",
    "StrategySpec",
    "Trainer",
    "TrainerSpec",
    "TrainingError",
    "TunesmithError",
    "create_plugin_manager",
    "hookimpl",
    "hookspec",
]
