"""Entry-point module registering the built-in optimizers."""

from __future__ import annotations

import torch

from tunesmith import OptimizerSpec, hookimpl


def build_adamw(param_groups, learning_rate: float, **options) -> torch.optim.Optimizer:
    return torch.optim.AdamW(param_groups, lr=learning_rate, betas=(0.9, 0.999), eps=1e-8)


def build_sgd(param_groups, learning_rate: float, **options) -> torch.optim.Optimizer:
    return torch.optim.SGD(param_groups, lr=learning_rate, momentum=0.9)


@hookimpl
def tunesmith_register_optimizers():
    return [
        OptimizerSpec(name="adamw", build=build_adamw, description="torch AdamW (betas 0.9/0.999)"),
        OptimizerSpec(name="sgd", build=build_sgd, description="torch SGD with momentum 0.9"),
    ]
