"""Continued pre-training: every token is trained.

Plain ``text`` rows are tokenized as they are (with the tokenizer's special tokens and a
closing end-of-sequence token); conversations are rendered with the chat template and trained
on every token.
"""

from __future__ import annotations

from tunesmith import Example, Sample, tokenize_chat, tokenize_text
from tunesmith_trainers.causal_lm import CausalLMTrainer


class PretrainTrainer(CausalLMTrainer):
    def prepare(self, example: Example) -> Sample:
        if example.messages is not None:
            sample = tokenize_chat(self.tokenizer, example.messages, columns=example.columns)
            return Sample(sample.input_ids, list(sample.input_ids), sample.columns)
        return tokenize_text(self.tokenizer, example.text, columns=example.columns)
