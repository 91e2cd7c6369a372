"""Direct Preference Optimization (Rafailov et al., 2023) and its loss variants.

Each pair is scored by the policy and by the reference model (the policy's base with its
adapter off, or a frozen copy): ``logits = (log pi(chosen) - log pi(rejected)) - (log ref(chosen)
- log ref(rejected))``, sums of response-token log-probabilities. The loss types, with
``beta`` the temperature and ``eps`` the label smoothing:

- ``sigmoid`` (DPO): ``-(1 - eps) log s(beta logits) - eps log s(-beta logits)``
- ``robust`` (rDPO, Chowdhury et al.): the same with ``+ eps``, divided by ``1 - 2 eps``
- ``hinge`` (SLiC, Zhao et al.): ``max(0, 1 - beta logits)``
- ``ipo`` (Azar et al.): ``(logits - 1 / (2 beta))^2`` on per-token average log-probabilities

and, on each side's own log-ratio ``c = log pi(chosen) - log ref(chosen)`` (``r`` for rejected):

- ``bco_pair`` (BCO, Jung et al.): ``-log s(beta c) - log s(-beta r)``
- ``nca_pair`` (NCA, Chen et al.): ``-log s(beta c) - (log s(-beta c) + log s(-beta r)) / 2``
- ``sppo_hard`` (SPPO, Wu et al., with hard win probabilities): ``(c - 1 / (2 beta))^2 + (r + 1 / (2 beta))^2``
- ``apo_zero`` (APO, D'Oosterlinck et al.): ``1 - s(beta c) + s(beta r)``, raising chosen and lowering rejected
- ``apo_down``: ``s(beta c) + 1 - s(beta (c - r))``, lowering both, rejected more

``--rpo-alpha`` adds the chosen responses' negative log-likelihood per token (RPO, Pang et al.).
``--precompute-ref-logps`` keeps each pair's reference log-probabilities once computed (the
first time the pair is seen), in checkpoints too: later epochs and a resumed run reuse them and
skip the reference pass for every batch whose pairs are all known.
Logged per pair: the implicit rewards ``beta (log pi - log ref)`` of both sides, how often the
chosen one wins, the margin, and the policy's log-probabilities.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
import torch.nn.functional as F

from tunesmith import LossOutput, sequence_logps
from tunesmith_trainers.preference import PairedPreferenceTrainer


def dpo_losses(chosen: torch.Tensor, rejected: torch.Tensor, loss_type: str, beta: float, label_smoothing: float) -> torch.Tensor:
    """The per-pair loss of each loss type from each side's log-ratio (policy minus reference log-probability)."""
    logits = chosen - rejected
    if loss_type == "sigmoid":
        return -(1 - label_smoothing) * F.logsigmoid(beta * logits) - label_smoothing * F.logsigmoid(-beta * logits)
    if loss_type == "robust":
        return (-(1 - label_smoothing) * F.logsigmoid(beta * logits) + label_smoothing * F.logsigmoid(-beta * logits)) / (1 - 2 * label_smoothing)
    if loss_type == "hinge":
        return torch.relu(1 - beta * logits)
    if loss_type == "ipo":
        return (logits - 1 / (2 * beta)) ** 2
    if loss_type == "bco_pair":
        return -F.logsigmoid(beta * chosen) - F.logsigmoid(-beta * rejected)
    if loss_type == "nca_pair":
        return -F.logsigmoid(beta * chosen) - 0.5 * F.logsigmoid(-beta * chosen) - 0.5 * F.logsigmoid(-beta * rejected)
    if loss_type == "sppo_hard":
        return (chosen - 0.5 / beta) ** 2 + (rejected + 0.5 / beta) ** 2
    if loss_type == "apo_zero":
        return 1 - torch.sigmoid(beta * chosen) + torch.sigmoid(beta * rejected)
    if loss_type == "apo_down":
        return torch.sigmoid(beta * chosen) + 1 - torch.sigmoid(beta * logits)
    raise ValueError(f"unknown DPO loss type {loss_type!r}")


class DPOTrainer(PairedPreferenceTrainer):
    def setup(self, context):
        super().setup(context)
        self.reference = context.make_reference(self.options["ref_model"] or None)
        #: with --precompute-ref-logps: each pair's reference log-probs (chosen, rejected), by pair key
        self.reference_cache: dict[int, tuple[float, float]] = {}

    def collate(self, rows):
        batch = super().collate(rows)
        if self.options["precompute_ref_logps"]:
            batch["pair_keys"] = torch.tensor([pair_key(pair) for row in rows for pair in row], dtype=torch.long)
        return batch

    def compute_loss(self, model, batch: dict[str, Any]) -> LossOutput:
        sequences = 2 * batch["num_pairs"]
        chosen, rejected = batch["chosen_index"], batch["rejected_index"]
        logps, counts = sequence_logps(model, batch, sequences)
        reference_logps = self.reference_logps(model, batch, sequences)
        beta, loss_type = self.options["beta"], self.options["loss_type"]
        scored, reference_scored = (logps / counts, reference_logps / counts) if loss_type == "ipo" else (logps, reference_logps)
        ratios = scored - reference_scored
        losses = dpo_losses(ratios[chosen], ratios[rejected], loss_type, beta, self.options["label_smoothing"])
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

    def reference_logps(self, model, batch: dict[str, Any], sequences: int) -> torch.Tensor:
        """The reference's log-probs of every sequence: from the cache when every pair of the batch is in it."""
        if not self.options["precompute_ref_logps"]:
            with self.reference(model) as reference:
                return sequence_logps(reference, batch, sequences)[0]
        keys = batch["pair_keys"].tolist()
        chosen, rejected = batch["chosen_index"].tolist(), batch["rejected_index"].tolist()
        if not all(key in self.reference_cache for key in keys):
            with self.reference(model) as reference:
                computed = sequence_logps(reference, batch, sequences)[0].tolist()
            for key, c, r in zip(keys, chosen, rejected):
                self.reference_cache.setdefault(key, (computed[c], computed[r]))
        values = [0.0] * sequences
        for key, c, r in zip(keys, chosen, rejected):
            values[c], values[r] = self.reference_cache[key]
        return torch.tensor(values, dtype=torch.float32, device=batch["chosen_index"].device)

    def state_dict(self) -> dict[str, Any]:
        if not self.reference_cache:
            return {}
        keys = list(self.reference_cache)
        return {
            "reference_keys": torch.tensor(keys, dtype=torch.long),
            "reference_logps": torch.tensor([self.reference_cache[key] for key in keys], dtype=torch.float64),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "reference_keys" in state:
            self.reference_cache = {
                key: (chosen, rejected) for key, (chosen, rejected) in zip(state["reference_keys"].tolist(), state["reference_logps"].tolist())
            }


def pair_key(pair) -> int:
    """A stable 63-bit key of a pair's tokens: the same pair gets the same key in every run."""
    digest = hashlib.blake2b(digest_size=8)
    for ids in (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids):
        digest.update(len(ids).to_bytes(4, "little") + b"".join(token.to_bytes(4, "little") for token in ids))
    return int.from_bytes(digest.digest(), "little") >> 1
