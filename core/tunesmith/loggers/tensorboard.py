"""The ``tensorboard`` logger: event files under ``OUTPUT/runs/`` (``tensorboard --logdir OUTPUT/runs``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from torch.utils.tensorboard import SummaryWriter

from tunesmith.loggers import MetricsLogger, numeric_values


class TensorBoardLogger(MetricsLogger):
    def start(self, config: dict[str, Any], output_dir: Path, step: int = 0) -> None:
        # A resumed run logs the steps after its checkpoint again; purging from there hides the
        # first attempt's events for them, as metrics.jsonl drops its lines.
        self.writer = SummaryWriter(log_dir=str(output_dir / "runs"), purge_step=step + 1)
        self.writer.add_text("config", "```\n" + yaml.safe_dump(config, sort_keys=False) + "```", global_step=step)

    def log(self, record: dict[str, Any]) -> None:
        for key, value in numeric_values(record).items():
            self.writer.add_scalar(key, value, global_step=record["step"])

    def finish(self) -> None:
        self.writer.close()
