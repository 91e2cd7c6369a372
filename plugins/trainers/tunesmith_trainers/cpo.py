"""Contrastive Preference Optimization (Xu et al., 2024): DPO's loss without the reference, plus behaviour cloning.

Each pair is scored by the policy alone: ``logits = log pi(chosen) - log pi(rejected)``, sums of
response-token log-probabilities. The loss types, with ``beta`` the temperature and ``eps`` the
label smoothing:

- ``sigmoid`` (CPO): ``-(1 - eps) log s(beta logits) - eps log s(-beta logits)``
- ``hinge`` (SLiC): ``max(0, 1 - beta logits)``
- ``ipo``: ``(logits - 1 / (2 beta))^2`` on per-token mean log-probabilities

plus ``alpha * NLL(chosen)``, the chosen responses' negative log-likelihood per token (the
paper's behaviour-cloning term; ``--cpo-alpha``, 1 by default as in TRL; 0 leaves it out).
Label smoothing applies to ``sigmoid`` only: with another loss type it is refused.

The implicit rewards logged are ``beta * log pi(y)`` (per-token means for ``ipo``), as TRL's
CPOTrainer logs them.
"""

from __future__ import annotations

import torch

from tunesmith import ConfigError
from tunesmith_trainers.dpo import dpo_losses
from tunesmith_trainers.reference_free import PairScores, ReferenceFreePreferenceTrainer


def cpo_losses(chosen: torch.Tensor, rejected: torch.Tensor, loss_type: str, beta: float, label_smoothing: float) -> torch.Tensor:
    """Each pair's preference loss from the policy's scores of its chosen and rejected responses (no NLL)."""
    if loss_type not in ("sigmoid", "hinge", "ipo"):
        raise ValueError(f"unknown CPO loss type {loss_type!r}")
    return dpo_losses(chosen, rejected, loss_type, beta, label_smoothing)


class CPOTrainer(ReferenceFreePreferenceTrainer):
    def setup(self, context):
        super().setup(context)
        if self.options["label_smoothing"] and self.options["loss_type"] != "sigmoid":
            raise ConfigError(f"--label-smoothing applies to the sigmoid loss only; this run uses --loss-type {self.options['loss_type']}")

    def length_normalised(self) -> bool:
        return self.options["loss_type"] == "ipo"

    def nll_weight(self) -> float:
        return self.options["cpo_alpha"]

    def score_pairs(self, chosen: torch.Tensor, rejected: torch.Tensor) -> PairScores:
        beta = self.options["beta"]
        losses = cpo_losses(chosen, rejected, self.options["loss_type"], beta, self.options["label_smoothing"])
        return PairScores(losses, beta * chosen, beta * rejected)
