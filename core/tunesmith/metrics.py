"""``OUTPUT/metrics.jsonl``: one JSON object per logged step or evaluation."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


class MetricsLog:
    def __init__(self, path: Path):
        self.path = path

    def truncate_after(self, step: int) -> None:
        """Drop lines logged after ``step``: a resumed run logs those steps again."""
        if not self.path.is_file():
            return
        kept = [line for line in self.path.read_text(encoding="utf-8").splitlines() if _step_of(line) is not None and _step_of(line) <= step]
        temporary = self.path.with_name(self.path.name + ".tmp")
        temporary.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        temporary.replace(self.path)

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps({key: _plain(value) for key, value in record.items()})
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")
            handle.flush()
            os.fsync(handle.fileno())


def _step_of(line: str) -> int | None:
    """The step a line records; None for a line a killed process left half-written."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def _plain(value: Any) -> Any:
    """JSON has no NaN or infinity: write them as strings so every line stays valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value
