"""The records that flow through the data pipeline."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

IGNORE_INDEX = -100


@dataclass
class Example:
    """One dataset row, normalised: a conversation (``messages``) or plain ``text``.

    ``source`` and ``row`` locate it for error messages (file path, 1-based line or row
    number); ``columns`` carries every other field of the row untouched (reward plugins and
    later trainers read them).
    """

    source: str
    row: int
    messages: list[dict[str, str]] | None = None
    text: str | None = None
    columns: dict[str, Any] = field(default_factory=dict)

    @property
    def where(self) -> str:
        return f"{self.source}:{self.row}"


@dataclass
class Sample:
    """A tokenized example: ``labels[i]`` is ``input_ids[i]`` where it is trained, else -100.

    Labels are *not* shifted; the collator shifts them per sample so no target ever crosses
    a sample boundary in a packed row.
    """

    input_ids: list[int]
    labels: list[int]
    columns: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_trained_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels[1:])
