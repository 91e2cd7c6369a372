"""The reference model a preference objective compares the policy with.

With an adapter (LoRA, DoRA, QLoRA) the reference is the policy's own base with the adapter
switched off for the forward pass: no second copy of the weights in memory. With full
fine-tuning, or when the trainer names another model (``--ref-model PATH``), it is a frozen
copy loaded on first use and placed by the strategy. Either way its passes run without
gradients.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch

from tunesmith.strategy import Strategy


class ReferenceModel:
    def __init__(self, strategy: Strategy, shares_weights: bool, load_copy: Callable[[], torch.nn.Module]):
        self.strategy = strategy
        #: the reference is the policy's base with its adapter off (no copy of its own)
        self.shares_weights = shares_weights
        self.load_copy = load_copy
        self._copy: torch.nn.Module | None = None

    @contextmanager
    def __call__(self, policy: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """The model to call for reference forward passes, while the context lasts."""
        with torch.no_grad():
            if self.shares_weights:
                with self.strategy.unwrap(policy).disable_adapter():
                    yield policy
            else:
                if self._copy is None:
                    self._copy = self.strategy.place_frozen(self.load_copy().requires_grad_(False).eval())
                yield self._copy
