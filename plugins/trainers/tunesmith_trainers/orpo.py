"""Odds Ratio Preference Optimization (Hong et al., 2024): supervised fine-tuning and preference in one loss, no reference.

With ``p(y) = exp(mean log pi(y))``, the per-token mean log-probability of a response, its odds
are ``odds(y) = p / (1 - p)``, so ``log odds(y) = mean log pi(y) - log(1 - exp(mean log pi(y)))``.
Per pair, with ``lambda`` the weight of the odds-ratio term:

    loss = NLL(chosen) - lambda * log s(log odds(chosen) - log odds(rejected))

``NLL(chosen)`` is the chosen responses' negative log-likelihood per token (see
:mod:`tunesmith_trainers.reference_free`); it is always on, with weight 1. Only response tokens
count: the paper's L_SFT. (TRL's ORPOTrainer takes the chosen NLL over the prompt tokens too.)
``log(1 - exp(x))`` is computed stably on both sides of ``x = -log 2``.

Logged per pair besides the shared metrics: the rewards ``lambda * mean log pi(y)``;
``log_odds_ratio``, ``log s(log odds(chosen) - log odds(rejected))``; and ``log_odds_chosen``,
``log odds(chosen) - log odds(rejected)`` (TRL's names for the two).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tunesmith_trainers.reference_free import PairScores, ReferenceFreePreferenceTrainer


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x < 0``: through ``expm1`` near 0, ``log1p`` further out (Maechler, 2012)."""
    near_zero = x > -math.log(2)
    return torch.where(near_zero, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def odds_ratio_losses(chosen: torch.Tensor, rejected: torch.Tensor, orpo_lambda: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Each pair's odds-ratio loss ``-lambda log s(log odds ratio)`` and the log odds ratio, from per-token mean log-probs."""
    chosen, rejected = chosen.float(), rejected.float()
    log_odds = (chosen - log1mexp(chosen)) - (rejected - log1mexp(rejected))
    return -orpo_lambda * F.logsigmoid(log_odds), log_odds


class ORPOTrainer(ReferenceFreePreferenceTrainer):
    def length_normalised(self) -> bool:
        return True

    def nll_weight(self) -> float:
        return 1.0

    def score_pairs(self, chosen: torch.Tensor, rejected: torch.Tensor) -> PairScores:
        orpo_lambda = self.options["orpo_lambda"]
        losses, log_odds = odds_ratio_losses(chosen, rejected, orpo_lambda)
        return PairScores(
            losses,
            orpo_lambda * chosen,
            orpo_lambda * rejected,
            {"log_odds_ratio": F.logsigmoid(log_odds), "log_odds_chosen": log_odds},
        )
