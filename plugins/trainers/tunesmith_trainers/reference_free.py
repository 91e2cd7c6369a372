"""What the reference-free pairwise objectives (ORPO, SimPO, CPO) share: one pass, no reference.

Each pair's chosen and rejected responses are scored by the policy alone, in the one forward
pass of :class:`~tunesmith_trainers.preference.PairedPreferenceTrainer`'s batch: the sum of
their response tokens' log-probabilities, or its mean per token for the objectives that
normalise by length. An objective turns the two scores into a loss per pair and two implicit
rewards; this base adds the chosen responses' negative log-likelihood and the metrics.

The chosen NLL is TRL's: the mean over every chosen response token of the micro-batch,
``NLL = -sum_i log pi(chosen_i) / sum_i |chosen_i|`` (token-weighted, not a mean of per-pair
means). The engine divides a batch's summed loss by its pairs, so each pair carries
``NLL`` in full: summed over the micro-batch's P pairs that is ``P * NLL``, and the micro-batch's
mean loss is TRL's ``losses.mean() + weight * NLL``. Under gradient accumulation each
micro-batch's NLL counts by its share of the step's pairs.

Logged per pair (the engine prints means): ``rewards/chosen`` and ``rewards/rejected``, the
implicit rewards; ``rewards/accuracies``, how often the chosen one's is higher;
``rewards/margins``; ``logps/chosen`` and ``logps/rejected``, the scores the loss compares (sums,
or per-token means where the objective normalises by length, as TRL logs them); ``nll_loss``,
the chosen NLL above (logged also when its weight is 0); and the objective's own.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch

from tunesmith import LossOutput, sequence_logps
from tunesmith_trainers.preference import PairedPreferenceTrainer


@dataclass
class PairScores:
    """An objective's verdict on a batch's pairs: (P,) tensors, and its own metrics per pair."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


def chosen_nll(chosen_logps: torch.Tensor, chosen_counts: torch.Tensor) -> torch.Tensor:
    """The chosen responses' negative log-likelihood per token over the whole batch (TRL's cross-entropy mean)."""
    return -chosen_logps.sum() / chosen_counts.sum().clamp(min=1)


class ReferenceFreePreferenceTrainer(PairedPreferenceTrainer):
    """A pairwise objective on the policy's own scores of the chosen and rejected responses."""

    def length_normalised(self) -> bool:
        """Whether the objective compares per-token mean log-probabilities rather than sums."""
        return False

    def nll_weight(self) -> float:
        """Weight of the chosen responses' NLL in the loss; 0 leaves it out."""
        return 0.0

    @abstractmethod
    def score_pairs(self, chosen: torch.Tensor, rejected: torch.Tensor) -> PairScores:
        """Loss and rewards of each pair from the policy's (P,) scores of its chosen and rejected responses."""

    def compute_loss(self, model, batch: dict[str, Any]) -> LossOutput:
        pairs = batch["num_pairs"]
        chosen, rejected = batch["chosen_index"], batch["rejected_index"]
        logps, counts = sequence_logps(model, batch, 2 * pairs)
        scores = logps / counts.clamp(min=1) if self.length_normalised() else logps
        scored = self.score_pairs(scores[chosen], scores[rejected])
        nll = chosen_nll(logps[chosen], counts[chosen])
        loss = scored.losses.sum()
        if self.nll_weight():
            loss = loss + self.nll_weight() * pairs * nll
        chosen_rewards, rejected_rewards = scored.chosen_rewards.detach(), scored.rejected_rewards.detach()
        metrics = {
            "rewards/chosen": float(chosen_rewards.sum()),
            "rewards/rejected": float(rejected_rewards.sum()),
            "rewards/accuracies": float((chosen_rewards > rejected_rewards).sum()),
            "rewards/margins": float((chosen_rewards - rejected_rewards).sum()),
            "logps/chosen": float(scores[chosen].detach().sum()),
            "logps/rejected": float(scores[rejected].detach().sum()),
            "nll_loss": float(nll.detach()) * pairs,
        }
        metrics.update({key: float(value.detach().sum()) for key, value in scored.metrics.items()})
        return LossOutput(loss, metrics)
