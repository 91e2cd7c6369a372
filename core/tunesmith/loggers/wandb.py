"""The ``wandb`` logger: a Weights & Biases run whose files are kept under ``OUTPUT/wandb/``.

wandb reads its own settings from the environment: ``WANDB_MODE=offline`` keeps the run on
disk (``wandb sync`` uploads it later), ``WANDB_PROJECT`` names the project (``tunesmith``
here when unset), ``WANDB_NAME`` the run (the output folder's name when unset).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import wandb

from tunesmith.loggers import MetricsLogger, numeric_values


class WandbLogger(MetricsLogger):
    def start(self, config: dict[str, Any], output_dir: Path, step: int = 0) -> None:
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT") or "tunesmith",
            name=os.environ.get("WANDB_NAME") or output_dir.resolve().name,
            dir=str(output_dir),
            config=config,
        )

    def log(self, record: dict[str, Any]) -> None:
        self.run.log(numeric_values(record), step=record["step"])

    def finish(self) -> None:
        self.run.finish()
