"""Entry-point module registering the built-in optimizers (named by path: torch loads only when one is built)."""

from __future__ import annotations

from tunesmith import OptimizerSpec, hookimpl


@hookimpl
def tunesmith_register_optimizers():
    return [
        OptimizerSpec(name="adamw", build="tunesmith_optimizers.torch_optimizers:build_adamw", description="torch AdamW (betas 0.9/0.999)"),
        OptimizerSpec(name="sgd", build="tunesmith_optimizers.torch_optimizers:build_sgd", description="torch SGD with momentum 0.9"),
    ]
