"""Reward modelling on preference pairs: a Bradley-Terry model of which response is preferred.

The model is the base with a one-output score head (``model_kind="sequence_classification"``);
the reward of a sequence (prompt and response) is the head's output at its last token. Each
pair's loss is ``-log s(r_chosen - r_rejected - margin)``, with ``margin`` an optional number in
the row (a ``margin`` column; 0 without one) by which the chosen response should win (as in
Llama 2's reward models and TRL's RewardTrainer). Logged per pair: how often the chosen response
scores higher (``accuracy``), both rewards and their difference.

Packing works: every sample's reward is read at its own last position (``sample_ids``), and
attention never crosses samples in a packed row.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from tunesmith import DataError, Example, LossOutput, sequence_scores
from tunesmith_trainers.preference import PairedPreferenceTrainer, PreferencePair


def bradley_terry_losses(chosen: torch.Tensor, rejected: torch.Tensor, margins: torch.Tensor | None = None) -> torch.Tensor:
    """Each pair's ``-log sigmoid(r_chosen - r_rejected - margin)``."""
    difference = chosen - rejected
    if margins is not None:
        difference = difference - margins
    return -F.logsigmoid(difference)


def pair_margin(example: Example) -> float:
    """The row's ``margin`` column as a float (0 without one); anything but a finite number is refused, naming the row."""
    value = example.columns.get("margin")
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DataError(f"{example.where}: margin: expected a number (how far the chosen response should win), got {value!r}")
    return float(value)


class RewardModelTrainer(PairedPreferenceTrainer):
    def prepare(self, example: Example) -> PreferencePair:
        pair = super().prepare(example)
        pair.columns["margin"] = pair_margin(example)
        return pair

    def collate(self, rows: list[list[PreferencePair]]) -> dict[str, Any]:
        batch = super().collate(rows)
        batch["margins"] = torch.tensor([pair.columns["margin"] for row in rows for pair in row], dtype=torch.float32)
        return batch

    def compute_loss(self, model, batch: dict[str, Any]) -> LossOutput:
        rewards = sequence_scores(model, batch)
        chosen, rejected = rewards[batch["chosen_index"]], rewards[batch["rejected_index"]]
        losses = bradley_terry_losses(chosen, rejected, batch["margins"].to(rewards.device))
        chosen, rejected = chosen.detach(), rejected.detach()
        return LossOutput(losses.sum(), {
            "accuracy": float((chosen > rejected).sum()),
            "rewards/chosen": float(chosen.sum()),
            "rewards/rejected": float(rejected.sum()),
            "rewards/margins": float((chosen - rejected).sum()),
        })
