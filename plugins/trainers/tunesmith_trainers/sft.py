"""Supervised fine-tuning: conversations rendered with the chat template, loss on assistant turns only.

Rows of plain ``text`` are accepted too and trained on every token, as TRL's SFTTrainer does;
the first one met is pointed out, since a file meant as chats rarely should be.
"""

from __future__ import annotations

import os

import click

from tunesmith import DataError, Example, Sample, tokenize_chat, tokenize_text
from tunesmith_trainers.causal_lm import CausalLMTrainer


class SFTTrainer(CausalLMTrainer):
    said_plain_text = False

    def prepare(self, example: Example) -> Sample:
        if example.messages is not None:
            if not any(message["role"] == "assistant" for message in example.messages):
                raise DataError(f"{example.where}: the conversation has no assistant message, so nothing would be trained")
            return tokenize_chat(self.tokenizer, example.messages, columns=example.columns)
        self._note_plain_text(example)
        return tokenize_text(self.tokenizer, example.text, columns=example.columns)

    def _note_plain_text(self, example: Example) -> None:
        if self.said_plain_text or os.environ.get("RANK", "0") != "0":
            return
        self.said_plain_text = True
        click.echo(
            f"note: {example.where} and other plain text rows are trained on every token, as `tunesmith pt` does; "
            "conversations (OpenAI messages, ShareGPT, Alpaca) train on the assistant's turns only",
            err=True,
        )
