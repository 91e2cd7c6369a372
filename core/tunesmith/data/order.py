"""The order rows are visited in: a fresh seeded permutation per epoch, taken a global batch at a time.

The permutation depends only on the seed, the epoch and (when grouping by length) the rows'
lengths, and the position is counted in rows of the whole job (``epoch``, ``epoch_rows``), not
per process. A resumed run, on any number of processes with the same global batch, finds the
exact rows where the interrupted one stopped.

Grouping by length (``lengths`` given) works like Hugging Face's ``group_by_length``: the
permutation is cut into *megabatches* of :data:`STEPS_PER_MEGABATCH` steps, each sorted by
length so that rows of similar length share a step (and its micro-batches: less padding),
and the megabatch's steps are then shuffled, so long and short steps alternate at random. A
last, partial step stays last, so every step but the epoch's last is whole.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

#: steps whose rows are sorted by length together
STEPS_PER_MEGABATCH = 50


class BatchOrder:
    def __init__(self, num_rows: int, global_batch: int, seed: int, lengths: Sequence[int] | None = None):
        self.num_rows = num_rows
        self.global_batch = global_batch
        self.seed = seed
        self.lengths = lengths
        #: the last step of an epoch takes the rows that are left, so an epoch is whole steps
        self.steps_per_epoch = math.ceil(num_rows / global_batch)
        self._epoch = -1
        self._permutation: list[int] = []

    def step_rows(self, epoch: int, epoch_rows: int) -> list[int]:
        """Indices of the rows one optimizer step trains on, over every data-parallel rank."""
        if epoch != self._epoch:
            self._permutation = self._epoch_order(epoch)
            self._epoch = epoch
        return self._permutation[epoch_rows : epoch_rows + self.global_batch]

    def _epoch_order(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        permutation = torch.randperm(self.num_rows, generator=generator).tolist()
        if self.lengths is None:
            return permutation
        megabatch = self.global_batch * STEPS_PER_MEGABATCH
        grouped: list[int] = []
        for start in range(0, self.num_rows, megabatch):
            by_length = sorted(permutation[start : start + megabatch], key=lambda row: self.lengths[row], reverse=True)
            steps = [by_length[i : i + self.global_batch] for i in range(0, len(by_length), self.global_batch)]
            partial = steps.pop() if len(steps[-1]) < self.global_batch else []
            for index in torch.randperm(len(steps), generator=generator).tolist():
                grouped.extend(steps[index])
            grouped.extend(partial)
        return grouped

    def advance(self, epoch: int, epoch_rows: int) -> tuple[int, int]:
        """The position after the step at ``(epoch, epoch_rows)``."""
        epoch_rows += self.global_batch
        if epoch_rows >= self.num_rows:
            return epoch + 1, 0
        return epoch, epoch_rows

    def epoch_progress(self, epoch: int, epoch_rows: int) -> float:
        """Epochs done, as a fraction (2.5 is half-way through the third)."""
        return epoch + epoch_rows / self.num_rows
