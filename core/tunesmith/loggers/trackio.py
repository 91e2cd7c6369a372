"""The ``trackio`` logger: a Trackio run in its local database (``trackio show`` opens the
dashboard), or on a Hugging Face Space when ``TRACKIO_SPACE_ID`` names one.

As in transformers' Trackio integration, ``TRACKIO_PROJECT`` names the project (``tunesmith``
here when unset) and ``TRACKIO_DIR`` the folder of the local database (Trackio's default under
the Hugging Face cache when unset); the run is named after the output folder and holds every
option as its config. A resumed run continues the run of that name.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import trackio

from tunesmith.loggers import MetricsLogger, numeric_values


class TrackioLogger(MetricsLogger):
    def start(self, config: dict[str, Any], output_dir: Path, step: int = 0) -> None:
        self.run = trackio.init(
            project=os.environ.get("TRACKIO_PROJECT") or "tunesmith",
            name=output_dir.resolve().name,
            space_id=os.environ.get("TRACKIO_SPACE_ID") or None,
            config=config,
            resume="allow" if step else "never",
        )

    def log(self, record: dict[str, Any]) -> None:
        self.run.log(numeric_values(record), step=record["step"])

    def finish(self) -> None:
        self.run.finish()
