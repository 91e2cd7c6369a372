"""Adapter folders written by training: recognising one, finding the base model it was trained on,
and loading several onto one model by name.

A LoRA/DoRA run writes peft adapter folders at ``OUTPUT/checkpoint-N/`` and ``OUTPUT/final/``
and its resolved options at ``OUTPUT/config.yaml``, whose ``model`` key names the base model.
Each adapter folder's ``adapter_config.json`` names it too (``base_model_name_or_path``: the
built-in alias, or the model folder's path), for an adapter folder copied without its run.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from tunesmith.errors import ConfigError
from tunesmith.models import DEFAULT_MODEL

RUN_CONFIG = "config.yaml"


def adapter_folder(adapter: str, if_full_model: str) -> Path:
    """``adapter`` as a path, checked to be a peft adapter folder; ``if_full_model`` is what the
    error tells a user who passed a full model folder instead, which differs by command."""
    path = Path(adapter).expanduser()
    if not path.is_dir():
        raise ConfigError(f"--adapter {adapter}: no such folder; expected a peft adapter folder (OUTPUT/final or OUTPUT/checkpoint-N)")
    if not (path / "adapter_config.json").is_file():
        hint = f" (it holds a full model: {if_full_model})" if (path / "config.json").is_file() else ""
        raise ConfigError(f"--adapter {adapter}: no adapter_config.json there, so it is not a peft adapter folder{hint}")
    return path


def base_model(model: str | None, adapter: Path | None) -> str:
    """The model to load: ``model`` when the user gave one, else the one recorded in the adapter's
    run, else the default."""
    if model is not None:
        return model
    if adapter is not None:
        recorded = recorded_base_model(adapter)
        if recorded is not None:
            return recorded
    return DEFAULT_MODEL


def recorded_base_model(adapter: Path) -> str | None:
    """The ``model`` key of the run's config.yaml next to ``adapter``; without that file, the
    ``base_model_name_or_path`` of its adapter_config.json; None when neither names one."""
    config_path = adapter.parent / RUN_CONFIG
    if not config_path.is_file():
        return _adapter_config_base_model(adapter)
    try:
        config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ConfigError(f"{config_path}: not valid YAML ({error}); pass the base model with --model") from error
    model = config.get("model") if isinstance(config, dict) else None
    if not isinstance(model, str) or not model:
        raise ConfigError(f"{config_path}: no 'model' key naming the base model; pass it with --model")
    return model


def _adapter_config_base_model(adapter: Path) -> str | None:
    config_path = adapter / "adapter_config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except ValueError as error:  # UnicodeDecodeError included
        raise ConfigError(f"{config_path}: not valid JSON ({error}); pass the base model with --model") from error
    model = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    return model if isinstance(model, str) and model else None


def load_named_adapters(model, adapters: dict[str, Path]):
    """``model`` wrapped in a peft model holding every adapter folder in ``adapters`` under its name.

    The folders are expected to be checked already (:func:`adapter_folder`); each adapter's
    weights go to the device its base layers are on. The first adapter is active; switch with
    ``set_adapter(name)``, or run the base model alone inside ``disable_adapter()``.
    """
    from peft import PeftModel

    (first_name, first_path), *others = adapters.items()
    wrapped = PeftModel.from_pretrained(model, first_path, adapter_name=first_name)
    for name, path in others:
        wrapped.load_adapter(path, adapter_name=name)
    wrapped.eval()
    return wrapped
