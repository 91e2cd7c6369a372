"""The causal language-modelling loss: cross-entropy of each target token, summed.

The batch comes from :func:`tunesmith.data.collate.collate_causal`: ``targets`` are already
shifted per sample, and ``position_ids`` without an attention mask keep packed samples apart.
The summed loss is normalised by the engine over every target token of an optimizer step.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from tunesmith.data.types import IGNORE_INDEX


def causal_lm_loss(model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """Cross-entropy in fp32 summed over the batch's target tokens."""
    logits = _logits(model, batch)
    targets = batch["targets"]
    trained = targets != IGNORE_INDEX
    # Upcasting only the trained positions keeps the fp32 copy of the (large) vocabulary
    # dimension to the tokens that count, rather than every position of the batch.
    return F.cross_entropy(logits[trained].float(), targets[trained], reduction="sum")


def sequence_logps(model: torch.nn.Module, batch: dict[str, Any], num_sequences: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sample's summed log-probability of its target tokens, and how many there are: two (N,) tensors.

    Samples are numbered by ``batch["sample_ids"]`` (:func:`tunesmith.data.collate.collate_causal`);
    only target positions count, so padding and untrained prompt tokens add nothing.
    """
    logits = _logits(model, batch)
    targets = batch["targets"]
    trained = targets != IGNORE_INDEX
    token_logps = -F.cross_entropy(logits[trained].float(), targets[trained], reduction="none")
    owners = batch["sample_ids"][trained]
    logps = torch.zeros(num_sequences, dtype=token_logps.dtype, device=token_logps.device).index_add(0, owners, token_logps)
    counts = torch.zeros(num_sequences, dtype=torch.long, device=owners.device).index_add(0, owners, torch.ones_like(owners))
    return logps, counts


def per_token_losses(model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """The fp32 cross-entropy of every position, (B, L); 0 where there is no target."""
    logits = _logits(model, batch)
    targets = batch["targets"]
    losses = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none")
    return losses.view(targets.shape)


def _logits(model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    # Through the top-level module, never its parts, so that peft and DDP/FSDP wrappers see the call.
    output = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
    return output.logits
