"""``ddp``: PyTorch DistributedDataParallel. Every process holds the whole model and optimizer;
gradients are averaged across processes during backward (bucketed all-reduce), skipped on
accumulation micro-batches that are not the last."""

from __future__ import annotations

import contextlib

import torch
from torch.nn.parallel import DistributedDataParallel

from tunesmith.strategies.process_group import ProcessGroupStrategy


class DDPStrategy(ProcessGroupStrategy):
    name = "ddp"
    gradient_reduction = "mean"
    holds_frozen_weights_in_compute_dtype = True

    def setup(self, model, make_optimizer, settings):
        model = model.to(self.root_device)
        device_ids = None if self.root_device.type == "cpu" else [self.root_device]
        wrapped = DistributedDataParallel(model, device_ids=device_ids)
        return wrapped, make_optimizer(model)

    def no_sync(self, model: torch.nn.Module, enabled: bool):
        return model.no_sync() if enabled else contextlib.nullcontext()

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.module if isinstance(model, DistributedDataParallel) else model
