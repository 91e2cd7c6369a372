"""``ProcessGroupStrategy``: the torch.distributed process group shared by multi-process strategies.

It creates the group on the device's collective backend (gloo, nccl, hccl ...) from the
launcher's environment, places this process on its local device, runs collectives on device
tensors, writes checkpoints with every process into one staging folder, and destroys the group
at teardown. Subclasses say how the model is wrapped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from tunesmith.atomic import write_atomically_together
from tunesmith.strategy import Strategy

REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


class ProcessGroupStrategy(Strategy):
    def setup_environment(self) -> None:
        self.root_device = self.device.setup(self.local_rank)
        if not dist.is_initialized():
            # One process that no launcher started (fsdp on one device, resuming a sharded run) needs no rendezvous.
            store = None if self.environment.launched else dist.HashStore()
            dist.init_process_group(backend=self.device.distributed_backend, rank=self.rank, world_size=self.world_size, store=store)

    def reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        if op not in (*REDUCE_OPS, "mean"):
            raise ValueError(f"reduce op {op!r}: expected one of {', '.join((*REDUCE_OPS, 'mean'))}")
        tensor = tensor.detach().clone().to(self.root_device)
        dist.all_reduce(tensor, op=REDUCE_OPS["sum" if op == "mean" else op])
        return tensor / self.world_size if op == "mean" else tensor

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.detach().contiguous().to(self.root_device)
        gathered = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(gathered, tensor)
        return torch.stack(gathered)

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        tensor = tensor.detach().clone().to(self.root_device)
        dist.broadcast(tensor, src=src)
        return tensor

    def all_gather_object(self, obj: Any) -> list[Any]:
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def barrier(self) -> None:
        dist.barrier()

    def write_atomically(self, target: Path, write_into: Callable[[Path], None]) -> None:
        write_atomically_together(target, write_into, leader=self.is_global_zero, barrier=self.barrier)

    def teardown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
