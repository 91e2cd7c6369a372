"""Loading the examples named by dataset specs, sampling and mixing them, and holding some out.

A spec is ``PATH`` (every row), ``PATH#N`` (N rows) or ``PATH#0.25`` (that fraction of the
rows). Sampling is seeded and draws without replacement; asking for more rows than the file has
repeats every row as many whole times as fit and samples the rest, so ``small.jsonl#3000`` next
to ``big.jsonl`` oversamples the small file. Files are concatenated in the order given and the
rows keep their file order: the engine shuffles once per epoch.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import TypeVar

from tunesmith.data.examples import CONVERSATION_FORMATS, RowFormat, read_examples
from tunesmith.data.readers import BadRowError
from tunesmith.data.types import Example
from tunesmith.errors import DataError
from tunesmith.hub import dataset_files, is_hub_id

T = TypeVar("T")

# A count is digits only; a ratio has a decimal point. Anything else after '#' is part of the path.
_SAMPLE_SUFFIX = re.compile(r"#(?P<count>\d+)$|#(?P<ratio>\d*\.\d+|\d+\.)$")


@dataclass
class LoadedData:
    examples: list[Example]
    #: rows skipped as malformed (only with ``skip_bad_rows``)
    bad_rows: int


@dataclass(frozen=True)
class DatasetSpec:
    path: str
    count: int | None = None
    ratio: float | None = None

    def rows_wanted(self, available: int) -> int:
        if self.count is not None:
            return self.count
        if self.ratio is not None:
            return max(1, round(self.ratio * available))
        return available


def parse_spec(spec: str) -> DatasetSpec:
    match = _SAMPLE_SUFFIX.search(spec)
    if match is None:
        return DatasetSpec(spec)
    path = spec[: match.start()]
    if match["count"] is not None:
        count = int(match["count"])
        if count == 0:
            raise DataError(f"{spec}: the row count after '#' must be at least 1")
        return DatasetSpec(path, count=count)
    ratio = float(match["ratio"])
    if ratio == 0:
        raise DataError(f"{spec}: the ratio after '#' must be above 0 (0.25 keeps a quarter of the rows)")
    return DatasetSpec(path, ratio=ratio)


def load_examples(
    specs: list[str], seed: int, skip_bad_rows: bool, formats: tuple[RowFormat, ...] = CONVERSATION_FORMATS, hub: str | None = None
) -> LoadedData:
    """Read, validate and sample every spec's file (in one of ``formats``), in order.

    A spec's path may be a Hub dataset ID (``ORG/NAME``, from ``hub``): its train split's files
    are read in turn. A malformed row raises :class:`DataError`, or with ``skip_bad_rows`` is
    skipped and counted. A file with no usable row is an error either way.
    """
    examples: list[Example] = []
    bad_rows = 0
    for text in specs:
        spec = parse_spec(text)
        skipped: list[BadRowError] = []
        paths = dataset_files(spec.path, hub) if is_hub_id(spec.path) else [spec.path]
        rows = [example for path in paths for example in read_examples(path, on_bad_row=skipped.append if skip_bad_rows else None, formats=formats)]
        bad_rows += len(skipped)
        if not rows:
            detail = f" ({len(skipped)} bad rows skipped; the first: {skipped[0]})" if skipped else ""
            raise DataError(f"no usable rows in {spec.path}{detail}")
        # Seeded per spec, so adding or removing one file does not change another file's sample.
        rng = random.Random(f"{seed}:{text}")
        examples.extend(sample_rows(rows, spec.rows_wanted(len(rows)), rng))
    return LoadedData(examples=examples, bad_rows=bad_rows)


def sample_rows(rows: list[T], wanted: int, rng: random.Random) -> list[T]:
    """``wanted`` of ``rows`` in file order: each row ``wanted // len(rows)`` times, plus a sample of the rest."""
    repeats, extra = divmod(wanted, len(rows))
    chosen = sorted(rng.sample(range(len(rows)), extra))
    return rows * repeats + [rows[index] for index in chosen]


def split_validation(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Hold out ``fraction`` of ``examples`` (at least one when ``fraction`` > 0) for evaluation.

    Returns ``(train, eval)``, both in their original order.
    """
    if fraction <= 0:
        return list(examples), []
    held_out = max(1, round(fraction * len(examples)))
    if held_out >= len(examples):
        raise DataError(
            f"--val-split {fraction} holds out {held_out} of {len(examples)} examples, leaving none to train on; "
            "lower it or pass --eval-dataset instead"
        )
    chosen = set(random.Random(seed).sample(range(len(examples)), held_out))
    train = [example for index, example in enumerate(examples) if index not in chosen]
    evaluation = [example for index, example in enumerate(examples) if index in chosen]
    return train, evaluation
