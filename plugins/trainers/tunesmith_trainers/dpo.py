"""Direct Preference Optimization (Rafailov et al., 2023) and its loss variants.

Each pair is scored by the policy and by the reference model (the policy's base with its
adapter off, or a frozen copy): ``logits = (log pi(chosen) - log pi(rejected)) - (log ref(chosen)
- log ref(rejected))``, sums of response-token log-probabilities. The loss types, with
``beta`` the temperature and ``eps`` the label smoothing:

- ``sigmoid`` (DPO): ``-(1 - eps) log s(beta logits) - eps log s(-beta logits)``
- ``robust`` (rDPO, Chowdhury et al.): the same with ``+ eps``, divided by ``1 - 2 eps``
- ``hinge`` (SLiC, Zhao et al.): ``max(0, 1 - beta logits)``
- ``ipo`` (Azar et al.): ``(logits - 1 / (2 beta))^2`` on per-token average log-probabilities

``--rpo-alpha`` adds the chosen responses' negative log-likelihood per token (RPO, Pang et al.).
Logged per pair: the implicit rewards ``beta (log pi - log ref)`` of both sides, how often the
chosen one wins, the margin, and the policy's log-probabilities.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from tunesmith import LossOutput, sequence_logps
from tunesmith_trainers.preference import PairedPreferenceTrainer


def dpo_losses(logits: torch.Tensor, loss_type: str, beta: float, label_smoothing: float) -> torch.Tensor:
    """The per-pair loss of each loss type from ``logits`` (policy minus reference log-ratio differences)."""
    if loss_type == "sigmoid":
        return -(1 - label_smoothing) * F.logsigmoid(beta * logits) - label_smoothing * F.logsigmoid(-beta * logits)
    if loss_type == "robust":
        return (-(1 - label_smoothing) * F.logsigmoid(beta * logits) + label_smoothing * F.logsigmoid(-beta * logits)) / (1 - 2 * label_smoothing)
    if loss_type == "hinge":
        return torch.relu(1 - beta * logits)
    if loss_type == "ipo":
        return (logits - 1 / (2 * beta)) ** 2
    raise ValueError(f"unknown DPO loss type {loss_type!r}")


class DPOTrainer(PairedPreferenceTrainer):
    def setup(self, context):
        super().setup(context)
        self.reference = context.make_reference(self.options["ref_model"] or None)

    def compute_loss(self, model, batch: dict[str, Any]) -> LossOutput:
        sequences = 2 * batch["num_pairs"]
        chosen, rejected = batch["chosen_index"], batch["rejected_index"]
        logps, counts = sequence_logps(model, batch, sequences)
        with self.reference(model) as reference:
            reference_logps, _ = sequence_logps(reference, batch, sequences)
        beta, loss_type = self.options["beta"], self.options["loss_type"]
        scored, reference_scored = (logps / counts, reference_logps / counts) if loss_type == "ipo" else (logps, reference_logps)
        logits = (scored[chosen] - scored[rejected]) - (reference_scored[chosen] - reference_scored[rejected])
        losses = dpo_losses(logits, loss_type, beta, self.options["label_smoothing"])
        if self.options["rpo_alpha"]:
            chosen_nll = -logps[chosen].sum() / counts[chosen].sum()
            losses = losses + self.options["rpo_alpha"] * chosen_nll
        chosen_rewards = beta * (logps[chosen] - reference_logps[chosen]).detach()
        rejected_rewards = beta * (logps[rejected] - reference_logps[rejected]).detach()
        return LossOutput(losses.sum(), {
            "rewards/chosen": float(chosen_rewards.sum()),
            "rewards/rejected": float(rejected_rewards.sum()),
            "rewards/accuracies": float((chosen_rewards > rejected_rewards).sum()),
            "rewards/margins": float((chosen_rewards - rejected_rewards).sum()),
            "logps/chosen": float(logps[chosen].detach().sum()),
            "logps/rejected": float(logps[rejected].detach().sum()),
        })
