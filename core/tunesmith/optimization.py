"""Parameter groups and learning-rate schedules, shared by every optimizer plugin."""

from __future__ import annotations

import math

import torch

SCHEDULERS = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters split so norms, biases and embeddings get no weight decay."""
    no_decay_ids = set()
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding) or "norm" in type(module).__name__.lower():
            no_decay_ids.update(id(p) for p in module.parameters(recurse=False))
    decay, no_decay = [], []
    for parameter in model.parameters():
        if not parameter.requires_grad:
            continue
        if parameter.ndim < 2 or id(parameter) in no_decay_ids:
            no_decay.append(parameter)
        else:
            decay.append(parameter)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


def warmup_steps(total_steps: int, warmup_steps: int, warmup_ratio: float) -> int:
    return warmup_steps if warmup_steps > 0 else math.ceil(total_steps * warmup_ratio)


def build_scheduler(name: str, optimizer: torch.optim.Optimizer, total_steps: int, num_warmup_steps: int):
    from transformers import get_scheduler

    return get_scheduler(SCHEDULERS[name], optimizer, num_warmup_steps=num_warmup_steps, num_training_steps=total_steps)
