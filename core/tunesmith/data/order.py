"""The order rows are visited in: a fresh seeded permutation per epoch.

The permutation depends only on the seed and the epoch, so a resumed run finds the exact
micro-batch where the interrupted one stopped from ``(epoch, micro_batch)`` alone.
"""

from __future__ import annotations

import math

import torch


class BatchOrder:
    def __init__(self, num_rows: int, batch_size: int, seed: int):
        self.num_rows = num_rows
        self.batch_size = batch_size
        self.seed = seed
        self.micro_batches_per_epoch = math.ceil(num_rows / batch_size)
        self._epoch = -1
        self._permutation: list[int] = []

    def indices(self, epoch: int, micro_batch: int) -> list[int]:
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._permutation = torch.randperm(self.num_rows, generator=generator).tolist()
            self._epoch = epoch
        start = micro_batch * self.batch_size
        return self._permutation[start : start + self.batch_size]

    def advance(self, epoch: int, micro_batch: int) -> tuple[int, int]:
        """The position after ``(epoch, micro_batch)``."""
        micro_batch += 1
        if micro_batch == self.micro_batches_per_epoch:
            return epoch + 1, 0
        return epoch, micro_batch
