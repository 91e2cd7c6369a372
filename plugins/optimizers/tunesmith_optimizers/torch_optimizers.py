"""The built-in optimizers: torch's own, with the hyperparameters fine-tuning recipes use."""

from __future__ import annotations

import torch


def build_adamw(param_groups, learning_rate: float, **options) -> torch.optim.Optimizer:
    return torch.optim.AdamW(param_groups, lr=learning_rate, betas=(0.9, 0.999), eps=1e-8)


def build_sgd(param_groups, learning_rate: float, **options) -> torch.optim.Optimizer:
    return torch.optim.SGD(param_groups, lr=learning_rate, momentum=0.9)
