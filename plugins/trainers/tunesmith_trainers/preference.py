"""Preference pairs: one prompt, a chosen and a rejected response, trained on together.

The prompt is rendered once with the chat template and shared by both responses; only
response tokens are scored. A pair is one data unit, so truncation and packing never split it:
in a batch its two sequences sit next to each other (in one packed row, or as two rows), and
one forward pass scores every chosen and rejected sequence of the batch at once.

``--max-length`` bounds a pair, both sequences together: each sequence gets half. Too long a
pair loses the start of its prompt first (the end, next to the responses, matters most), down to
a quarter of the length, then the ends of its responses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from tunesmith import (
    IGNORE_INDEX,
    PAIRED_PREFERENCE_FORMATS,
    Example,
    Sample,
    Trainer,
    collate_causal,
    tokenize_prompt_and_responses,
)


@dataclass
class PreferencePair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    columns: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        """Tokens the pair takes in a row: the prompt twice, once before each response."""
        return 2 * len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids)

    def sequences(self) -> tuple[Sample, Sample]:
        """The chosen and the rejected sequence, each labelled on its response only."""
        return tuple(
            Sample(self.prompt_ids + response, [IGNORE_INDEX] * len(self.prompt_ids) + response, self.columns)
            for response in (self.chosen_ids, self.rejected_ids)
        )


def truncate_pair(pair: PreferencePair, max_length: int) -> PreferencePair:
    half = max_length // 2
    longest = max(len(pair.chosen_ids), len(pair.rejected_ids))
    prompt_kept = min(len(pair.prompt_ids), max(half - longest, half // 2))
    response_kept = half - prompt_kept
    prompt = pair.prompt_ids[len(pair.prompt_ids) - prompt_kept :]
    return PreferencePair(prompt, pair.chosen_ids[:response_kept], pair.rejected_ids[:response_kept], pair.columns)


class PairedPreferenceTrainer(Trainer):
    """What every pairwise objective shares: the pair as its unit, and a batch scoring both sides in one pass."""

    row_formats = PAIRED_PREFERENCE_FORMATS

    def prepare(self, example: Example) -> PreferencePair:
        fields = example.fields
        prompt_ids, (chosen_ids, rejected_ids) = tokenize_prompt_and_responses(
            self.tokenizer, fields["prompt"], [fields["chosen"], fields["rejected"]]
        )
        return PreferencePair(prompt_ids, chosen_ids, rejected_ids, dict(example.columns))

    def truncate(self, unit: PreferencePair, max_length: int) -> PreferencePair:
        return truncate_pair(unit, max_length)

    def has_targets(self, unit: PreferencePair) -> bool:
        return bool(unit.chosen_ids) and bool(unit.rejected_ids)

    def collate(self, rows: list[list[PreferencePair]]) -> dict[str, Any]:
        """One causal batch holding every pair's two sequences, with where each pair's chosen and rejected are.

        Unpacked (one pair a row) the chosen sequences come first, then the rejected ones, as
        2 x pairs rows; packed, each row holds its pairs' sequences side by side.
        """
        pairs = [pair for row in rows for pair in row]
        if all(len(row) == 1 for row in rows):
            sequences = [pair.sequences() for pair in pairs]
            batch = collate_causal([[chosen] for chosen, _ in sequences] + [[rejected] for _, rejected in sequences], self.tokenizer.pad_token_id)
            chosen = torch.arange(len(pairs))
            rejected = chosen + len(pairs)
        else:
            batch = collate_causal([[sequence for pair in row for sequence in pair.sequences()] for row in rows], self.tokenizer.pad_token_id)
            chosen = torch.arange(0, 2 * len(pairs), 2)
            rejected = chosen + 1
        batch.update(chosen_index=chosen, rejected_index=rejected, num_pairs=len(pairs))
        return batch

    def count_items(self, batch: dict[str, Any]) -> int:
        return int(batch["num_pairs"])
