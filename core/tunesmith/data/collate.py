"""Building causal-LM batches from rows of samples.

There is no attention mask. Rows are right-padded, and under causal attention a real token
never attends to the padding after it. Each sample's ``position_ids`` restart at 0, so a packed
sample sees exactly what it would see alone: tunesmith's ``packed_sdpa`` attention
(:mod:`tunesmith.packed_attention`) splits the row where they restart, and transformers (>= 5.17),
given ``position_ids`` and no ``attention_mask`` nor cache, reads those restarts as sequence
boundaries for its own implementations (a block-diagonal mask for ``sdpa`` and ``eager``,
``masking_utils.find_packed_sequence_indices``; sequence lengths for flash attention).

The padding continues the positions of the row's last sample rather than restarting: padding
is never attended to and has no target, and a batch of one sample per row then has no restart
at all, so transformers builds no mask and attention takes its causal fast path (sdpa's
``is_causal``, which also skips the blocks above the diagonal) instead of reading a dense
(B, 1, L, L) mask in every layer.
"""

from __future__ import annotations

from typing import Any

import torch

from tunesmith.data.types import IGNORE_INDEX, Sample


def collate_causal(rows: list[list[Sample]], pad_token_id: int) -> dict[str, Any]:
    """``input_ids``, ``position_ids``, ``targets`` and ``sample_ids`` (B, L), plus token counts.

    ``targets[b, t]`` is the label of the token after ``t`` in the same sample, so the loss
    needs no shifting; the last token of each sample, and padding, have no target.
    ``sample_ids[b, t]`` numbers the samples in the order the rows list them (0, 1, ...; -1 on
    padding), for objectives that score whole sequences.
    """
    length = max(sum(len(sample) for sample in row) for row in rows)
    input_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), length), dtype=torch.long)
    targets = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    sample_ids = torch.full((len(rows), length), -1, dtype=torch.long)
    num_input_tokens = number = 0
    for b, row in enumerate(rows):
        start = 0
        for sample in row:
            end = start + len(sample)
            input_ids[b, start:end] = torch.tensor(sample.input_ids, dtype=torch.long)
            position_ids[b, start:end] = torch.arange(len(sample))
            targets[b, start : end - 1] = torch.tensor(sample.labels[1:], dtype=torch.long)
            sample_ids[b, start:end] = number
            start, number = end, number + 1
        num_input_tokens += start
        last_sample_start = start - len(row[-1])
        position_ids[b, start:] = torch.arange(start - last_sample_start, length - last_sample_start)
    return {
        "input_ids": input_ids,
        "position_ids": position_ids,
        "targets": targets,
        "sample_ids": sample_ids,
        "num_target_tokens": int((targets != IGNORE_INDEX).sum()),
        "num_input_tokens": num_input_tokens,
    }
