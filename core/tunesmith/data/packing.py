"""Grouping samples into rows: one sample per row, or several packed into rows of a maximum length.

Packing wastes no compute on padding. Samples in one row never see each other: the collator
restarts ``position_ids`` at every sample, from which the model builds a block-diagonal causal
mask, and it never makes a target cross a sample boundary.
"""

from __future__ import annotations

import bisect

from tunesmith.data.types import Sample


def unpacked(samples: list[Sample]) -> list[list[Sample]]:
    return [[sample] for sample in samples]


def pack(samples: list[Sample], max_length: int) -> list[list[Sample]]:
    """Pack ``samples`` into as few rows of at most ``max_length`` tokens as best-fit decreasing finds.

    Longest samples first, each into the row with the least room that still fits it; the
    result depends only on the samples' lengths and order.
    """
    rows: list[list[Sample]] = []
    # (room left, row index), sorted: the first entry with enough room is the best fit.
    rooms: list[tuple[int, int]] = []
    for sample in sorted(samples, key=len, reverse=True):
        if len(sample) > max_length:
            raise ValueError(f"a sample of {len(sample)} tokens cannot be packed into rows of {max_length}; truncate first")
        position = bisect.bisect_left(rooms, (len(sample), -1))
        if position == len(rooms):
            rows.append([sample])
            room, index = max_length, len(rows) - 1
        else:
            room, index = rooms.pop(position)
            rows[index].append(sample)
        room -= len(sample)
        if room > 0:
            bisect.insort(rooms, (room, index))
    return rows
