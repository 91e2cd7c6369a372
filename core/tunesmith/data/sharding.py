"""Which of a step's rows each data-parallel rank trains on.

A step's rows (in order) are cut into micro-batches of ``batch_size`` rows dealt out in turn:
micro-batch ``m`` of rank ``r`` is piece ``m * dp_size + r``. Ranks therefore see disjoint
rows whose union is the step, and one process (``dp_size`` 1) sees exactly the micro-batches it
would cut alone. Every rank gets the same number of micro-batches, because forward and backward
are collective under DDP and FSDP; when the step's rows run out (the last step of an epoch),
a rank's last pieces may be empty, and the engine runs them at zero weight.
"""

from __future__ import annotations

import math
from typing import Sequence, TypeVar

Row = TypeVar("Row")


def shard_step(rows: Sequence[Row], dp_size: int, dp_rank: int, batch_size: int) -> list[list[Row]]:
    """This rank's micro-batches of ``rows``, possibly ending in empty ones."""
    micro_batches = max(1, math.ceil(len(rows) / (dp_size * batch_size)))
    pieces = []
    for micro_batch in range(micro_batches):
        start = (micro_batch * dp_size + dp_rank) * batch_size
        pieces.append(list(rows[start : start + batch_size]))
    return pieces
