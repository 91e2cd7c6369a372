"""The order rows are visited in: a fresh seeded permutation per epoch, taken a global batch at a time.

The permutation depends only on the seed and the epoch, and the position is counted in rows
of the whole job (``epoch``, ``epoch_rows``), not per process. A resumed run, on any number of
processes with the same global batch, finds the exact rows where the interrupted one stopped.
"""

from __future__ import annotations

import math

import torch


class BatchOrder:
    def __init__(self, num_rows: int, global_batch: int, seed: int):
        self.num_rows = num_rows
        self.global_batch = global_batch
        self.seed = seed
        #: the last step of an epoch takes the rows that are left, so an epoch is whole steps
        self.steps_per_epoch = math.ceil(num_rows / global_batch)
        self._epoch = -1
        self._permutation: list[int] = []

    def step_rows(self, epoch: int, epoch_rows: int) -> list[int]:
        """Indices of the rows one optimizer step trains on, over every data-parallel rank."""
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._permutation = torch.randperm(self.num_rows, generator=generator).tolist()
            self._epoch = epoch
        return self._permutation[epoch_rows : epoch_rows + self.global_batch]

    def advance(self, epoch: int, epoch_rows: int) -> tuple[int, int]:
        """The position after the step at ``(epoch, epoch_rows)``."""
        epoch_rows += self.global_batch
        if epoch_rows >= self.num_rows:
            return epoch + 1, 0
        return epoch, epoch_rows

    def epoch_progress(self, epoch: int, epoch_rows: int) -> float:
        """Epochs done, as a fraction (2.5 is half-way through the third)."""
        return epoch + epoch_rows / self.num_rows
