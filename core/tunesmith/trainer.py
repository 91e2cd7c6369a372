"""The ``Trainer`` interface: a training objective plus the data format it reads.

A trainer never runs the loop, calls ``backward`` or steps the optimizer; the engine
(:mod:`tunesmith.engine`) does that for every trainer alike. A trainer turns an
:class:`~tunesmith.data.types.Example` into a :class:`~tunesmith.data.types.Sample`, collates
rows of samples into a batch, says how many items a batch holds (the loss is normalised over
every item of an optimizer step, across gradient-accumulation micro-batches), and computes the
summed loss of a batch with metrics to log.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch

from tunesmith.data.types import Example, Sample


@dataclass
class LossOutput:
    """``loss`` is summed over the batch's items; ``metrics`` are summed the same way."""

    loss: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)


class Trainer(ABC):
    #: registered name, set by the engine when it builds the trainer
    name: str = ""

    def __init__(self, tokenizer, config: Any = None):
        self.tokenizer = tokenizer
        self.config = config

    @abstractmethod
    def prepare(self, example: Example) -> Sample:
        """Tokenize one example; raise :class:`tunesmith.errors.DataError` naming ``example.where`` if it does not fit."""

    @abstractmethod
    def collate(self, rows: list[list[Sample]]) -> dict[str, Any]:
        """Build one batch from rows; each row holds one sample, or several when packed."""

    @abstractmethod
    def count_items(self, batch: dict[str, Any]) -> int:
        """How many items (target tokens, pairs ...) the batch's loss is summed over."""

    @abstractmethod
    def compute_loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> LossOutput:
        """The batch's loss summed over its items, computed with ``model``."""
