"""Supervised fine-tuning: conversations rendered with the chat template, loss on assistant turns only.

Rows of plain ``text`` are accepted too and trained on every token, as TRL's SFTTrainer does.
"""

from __future__ import annotations

from tunesmith import DataError, Example, Sample, tokenize_chat, tokenize_text
from tunesmith_trainers.causal_lm import CausalLMTrainer


class SFTTrainer(CausalLMTrainer):
    def prepare(self, example: Example) -> Sample:
        if example.messages is not None:
            if not any(message["role"] == "assistant" for message in example.messages):
                raise DataError(f"{example.where}: the conversation has no assistant message, so nothing would be trained")
            return tokenize_chat(self.tokenizer, example.messages, columns=example.columns)
        return tokenize_text(self.tokenizer, example.text, columns=example.columns)
