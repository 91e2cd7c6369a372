"""The ``mlflow`` logger: an MLflow run, in a local store under ``OUTPUT/mlruns/`` unless
``MLFLOW_TRACKING_URI`` names a tracking server or store.

``MLFLOW_EXPERIMENT_NAME`` names the experiment (``tunesmith`` when unset); the run is named
after the output folder and holds every option as a parameter.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from tunesmith.loggers import MetricsLogger, numeric_values

#: what MLflow accepts in one log_batch call
PARAMS_PER_BATCH = 100
PARAM_VALUE_LIMIT = 6000


class MLflowLogger(MetricsLogger):
    def start(self, config: dict[str, Any], output_dir: Path, step: int = 0) -> None:
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            uri = (output_dir / "mlruns").resolve().as_uri()
            # MLflow 3 refuses its file store unless asked for it by name; a run folder is the
            # one place that needs no server or database package.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "tunesmith"
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        self.run_id = self.client.create_run(experiment_id, run_name=output_dir.resolve().name).info.run_id
        params = [Param(key, str(value)[:PARAM_VALUE_LIMIT]) for key, value in config.items()]
        for first in range(0, len(params), PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=params[first : first + PARAMS_PER_BATCH])

    def log(self, record: dict[str, Any]) -> None:
        now = int(time.time() * 1000)
        metrics = [Metric(key, value, now, record["step"]) for key, value in numeric_values(record).items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def finish(self) -> None:
        self.client.set_terminated(self.run_id)
