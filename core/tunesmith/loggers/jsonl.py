"""The built-in ``jsonl`` logger: ``OUTPUT/metrics.jsonl``, one JSON object per line, always on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunesmith.loggers import MetricsLogger
from tunesmith.metrics import MetricsLog


class JsonlLogger(MetricsLogger):
    def start(self, config: dict[str, Any], output_dir: Path, step: int = 0) -> None:
        self.file = MetricsLog(output_dir / "metrics.jsonl")
        self.file.truncate_after(step)

    def log(self, record: dict[str, Any]) -> None:
        self.file.write(record)
