"""Next-token prediction, shared by ``sft`` and ``pt``: they differ only in which tokens are trained."""

from __future__ import annotations

from typing import Any

from tunesmith import LossOutput, Sample, Trainer, causal_lm_loss, collate_causal


class CausalLMTrainer(Trainer):
    def collate(self, rows: list[list[Sample]]) -> dict[str, Any]:
        return collate_causal(rows, pad_token_id=self.tokenizer.pad_token_id)

    def count_items(self, batch: dict[str, Any]) -> int:
        return int(batch["num_target_tokens"])

    def compute_loss(self, model, batch: dict[str, Any]) -> LossOutput:
        # The device's fused kernel (Liger's on CUDA) where it has one; a trainer used on its own has no device.
        fused = self.context.device.fused_linear_cross_entropy() if self.context is not None else None
        return LossOutput(loss=causal_lm_loss(model, batch, fused=fused))
