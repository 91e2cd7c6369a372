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
        return LossOutput(loss=causal_lm_loss(model, batch))
