"""The ``Strategy`` interface: how a model is placed, replicated or sharded across processes.

Shaped like Lightning Fabric's strategies. The training loop calls the strategy for every step
that parallelism changes (setup, backward, optimizer step, gradient sync, reductions,
checkpoint state); trainers never call ``backward`` or ``step`` themselves. The built-in
:class:`SingleDeviceStrategy` (``single``) runs in one process on one device.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from pathlib import Path

import torch

from tunesmith.atomic import write_atomically
from tunesmith.checkpoint import LoadedCheckpoint, load_checkpoint, save_checkpoint
from tunesmith.device import Device


class Strategy(ABC):
    name: str = ""

    def __init__(self, device: Device):
        self.device = device
        self.root_device: torch.device | None = None

    @property
    def world_size(self) -> int:
        return 1

    @property
    def rank(self) -> int:
        return 0

    @property
    def is_global_zero(self) -> bool:
        return self.rank == 0

    @abstractmethod
    def setup_environment(self) -> None:
        """Create the process group (if any) on the device's backend and set ``root_device``."""

    @abstractmethod
    def setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """Move, wrap or shard the model; return the module the loop should call."""

    def setup_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        return optimizer

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def clip_grad_norm(self, parameters, max_norm: float) -> torch.Tensor:
        """Clip gradients in place (``max_norm`` 0 measures without clipping); return the total norm."""
        parameters = [p for p in parameters if p.grad is not None]
        if max_norm and max_norm > 0:
            return torch.nn.utils.clip_grad_norm_(parameters, max_norm)
        return torch.nn.utils.clip_grad_norm_(parameters, float("inf"))

    def optimizer_step(self, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None = None) -> None:
        """Apply the gradients; with an enabled fp16 ``scaler`` the step goes through it."""
        if scaler is not None and scaler.is_enabled():
            scaler.step(optimizer)
        else:
            optimizer.step()

    def no_sync(self, model: torch.nn.Module, enabled: bool):
        """Skip gradient synchronisation for accumulation micro-batches that are not the last."""
        return contextlib.nullcontext()

    def reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over all processes."""
        return value

    def barrier(self) -> None:
        """Wait for every process."""

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The plain module inside whatever wrapper ``setup_model`` added."""
        return model

    def save_checkpoint(
        self, folder: Path, model, optimizer, scheduler, rng_state, loop_state, scaler_state=None, tokenizer=None
    ) -> None:
        """Write a complete checkpoint atomically.

        Every process calls this; a sharded strategy gathers (or writes its shards) here, and
        the default writes the unwrapped model from the first process.
        """
        if self.is_global_zero:
            save_checkpoint(folder, self.unwrap(model), optimizer, scheduler, rng_state, loop_state, scaler_state, tokenizer)
        self.barrier()

    def load_checkpoint(self, folder: Path, model, optimizer, scheduler) -> LoadedCheckpoint:
        """Restore weights, optimizer and scheduler from ``folder``; every process calls this."""
        return load_checkpoint(folder, self.unwrap(model), optimizer, scheduler)

    def save_final(self, folder: Path, model, tokenizer) -> None:
        """Write the trained result (peft adapter or full model, plus tokenizer) atomically."""
        if self.is_global_zero:
            unwrapped = self.unwrap(model)
            write_atomically(folder, lambda staging: (unwrapped.save_pretrained(staging), tokenizer.save_pretrained(staging)))
        self.barrier()

    def teardown(self) -> None:
        """Release the process group and other resources."""


class SingleDeviceStrategy(Strategy):
    name = "single"

    def setup_environment(self) -> None:
        self.root_device = self.device.setup(0)

    def setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.root_device)
