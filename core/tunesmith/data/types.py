"""The records that flow through the data pipeline."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

IGNORE_INDEX = -100


@dataclass
class Example:
    """One dataset row, normalised by its row format into ``fields``.

    The conversation formats give ``{"messages": [...]}`` or ``{"text": "..."}`` (read them as
    ``example.messages`` and ``example.text``); the preference formats give ``prompt``,
    ``chosen`` and ``rejected`` message lists, or ``prompt``, ``completion`` and ``label``.
    ``source`` and ``row`` locate it for error messages (file path, 1-based line or row
    number); ``columns`` carries every other field of the row untouched (reward plugins and
    trainers read them).
    """

    source: str
    row: int
    fields: dict[str, Any] = field(default_factory=dict)
    columns: dict[str, Any] = field(default_factory=dict)

    @property
    def where(self) -> str:
        return f"{self.source}:{self.row}"

    @property
    def messages(self) -> list[dict[str, str]] | None:
        return self.fields.get("messages")

    @property
    def text(self) -> str | None:
        return self.fields.get("text")


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
