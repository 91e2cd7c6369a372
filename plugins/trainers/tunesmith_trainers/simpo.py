"""Simple Preference Optimization (Meng et al., 2024): a length-normalised reward with a margin, no reference.

A response's implicit reward is ``beta * mean log pi(y)``, its per-token mean log-probability
scaled; the chosen one's must beat the rejected one's by the target margin ``gamma``. Per pair,
with ``eps`` the label smoothing:

    logits = beta * (mean log pi(chosen) - mean log pi(rejected)) - gamma
    loss   = -(1 - eps) log s(logits) - eps log s(-logits)

``eps = 0`` is the paper's loss; with ``eps > 0`` it is TRL's CPOTrainer ``simpo`` loss (the
conservative form of cDPO). ``--cpo-alpha`` adds the chosen responses' negative log-likelihood
per token with that weight (CPO-SimPO, as TRL does); 0, the default, is pure SimPO.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tunesmith_trainers.reference_free import PairScores, ReferenceFreePreferenceTrainer


def simpo_losses(chosen: torch.Tensor, rejected: torch.Tensor, beta: float, gamma: float, label_smoothing: float) -> torch.Tensor:
    """Each pair's SimPO loss from the per-token mean log-probabilities of its chosen and rejected responses."""
    logits = beta * (chosen - rejected) - gamma
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


class SimPOTrainer(ReferenceFreePreferenceTrainer):
    def length_normalised(self) -> bool:
        return True

    def nll_weight(self) -> float:
        return self.options["cpo_alpha"]

    def score_pairs(self, chosen: torch.Tensor, rejected: torch.Tensor) -> PairScores:
        beta = self.options["beta"]
        losses = simpo_losses(chosen, rejected, beta, self.options["gamma"], self.options["label_smoothing"])
        return PairScores(losses, beta * chosen, beta * rejected)
