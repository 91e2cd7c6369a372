"""Merging a trained LoRA/DoRA adapter into its base model, saved as a standalone model folder.

The result loads with plain ``transformers.AutoModelForCausalLM`` (and ``tunesmith infer --model``)
with no peft at run time. It is written into a temporary sibling folder and renamed into place
only when complete, so an interrupted export never leaves a half-written model under OUTPUT.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tunesmith.atomic import write_atomically
from tunesmith.data.tokenize import ensure_chat_template
from tunesmith.errors import ConfigError
from tunesmith.models import load_model, load_tokenizer, resolve_model
from tunesmith.runtime import Runtime


def export_merged(model: str, adapter: Path, output: Path, runtime: Runtime, force: bool = False, trust_remote_code: bool = False) -> Path:
    """Merge ``adapter`` into ``model`` on the runtime's device and save weights, config and tokenizer in ``output``."""
    _check_output(output, force)
    model_path = resolve_model(model)
    tokenizer = load_tokenizer(model_path, trust_remote_code)
    # The tokenizer saved with the weights must render chats as training did.
    ensure_chat_template(tokenizer)
    # Merging happens in float32 so adding the low-rank update does not round twice; the
    # result is then stored in the base's own dtype so a bf16 model does not double in size.
    # A reward model's adapter (task type SEQ_CLS, from `tunesmith rm`) carries its score head: merge onto a base that has one.
    adapter_config = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    kind = "sequence_classification" if adapter_config.get("task_type") == "SEQ_CLS" else "causal_lm"
    base = load_model(model_path, trust_remote_code, model_kind=kind, pad_token_id=tokenizer.pad_token_id).to(runtime.device.setup(0))
    from peft import PeftModel

    merged = PeftModel.from_pretrained(base, adapter).merge_and_unload()
    merged.to(_stored_dtype(model_path))

    def write(folder: Path) -> None:
        # transformers 5 writes safetensors only; no pickled weights are ever produced.
        merged.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    write_atomically(output, write)
    return output


def _check_output(output: Path, force: bool) -> None:
    if output.exists() and not output.is_dir():
        raise ConfigError(f"--output {output}: exists and is not a folder")
    if output.is_dir() and any(output.iterdir()) and not force:
        raise ConfigError(f"--output {output}: folder exists and is not empty; pass --force to replace it")


def _stored_dtype(model_path: Path) -> torch.dtype:
    config = json.loads((model_path / "config.json").read_text(encoding="utf-8"))
    # transformers 5 writes "dtype"; older folders say "torch_dtype".
    name = config.get("dtype") or config.get("torch_dtype")
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32
