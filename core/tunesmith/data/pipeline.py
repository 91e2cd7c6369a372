"""Turning examples into the trainer's data units, cut to the maximum length by the trainer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tunesmith.data.types import Example
from tunesmith.errors import DataError
from tunesmith.trainer import Trainer


@dataclass
class PreparedData:
    #: the trainer's data units (causal-LM samples, preference pairs ...)
    samples: list[Any]
    #: samples cut to ``max_length``
    truncated: int
    #: samples left out because no token was trained (usually: truncation cut every trained token)
    dropped: int
    #: examples the trainer rejected, skipped with ``skip_bad_rows``
    bad_rows: int


def prepare_samples(trainer: Trainer, examples: list[Example], max_length: int, skip_bad_rows: bool) -> PreparedData:
    """Run ``trainer.prepare`` on every example and let the trainer cut each unit to ``max_length`` tokens.

    A :class:`DataError` from the trainer stops, or with ``skip_bad_rows`` is counted and the
    example skipped. Having no sample left is an error.
    """
    samples: list[Any] = []
    truncated = dropped = bad_rows = 0
    first_error: DataError | None = None
    for example in examples:
        try:
            sample = trainer.prepare(example)
        except DataError as error:
            # Errors from the chat template do not know which row they came from.
            located = error if str(error).startswith(example.where) else DataError(f"{example.where}: {error}")
            if not skip_bad_rows:
                raise located from None
            bad_rows += 1
            first_error = first_error or located
            continue
        if len(sample) > max_length:
            sample = trainer.truncate(sample, max_length)
            truncated += 1
        if not trainer.has_targets(sample):
            dropped += 1
            continue
        samples.append(sample)
    if not samples:
        sources = ", ".join(dict.fromkeys(example.source for example in examples)) or "the data"
        reasons = []
        if bad_rows:
            reasons.append(f"{bad_rows} rejected, the first with: {first_error}")
        if dropped:
            reasons.append(f"{dropped} with no trained token left within --max-length {max_length}")
        raise DataError(f"no usable samples in {sources}" + (f" ({'; '.join(reasons)})" if reasons else ""))
    return PreparedData(samples=samples, truncated=truncated, dropped=dropped, bad_rows=bad_rows)
