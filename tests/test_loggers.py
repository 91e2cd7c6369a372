"""Experiment trackers (``--report-to``), their plugin hook, and the training curves
(``tunesmith plot``, ``OUTPUT/curves.png``), on a tiny model for a few steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import chat_rows, read_metrics, run_cli, write_jsonl
from tunesmith import ConfigError, LoggerSpec, MetricsLogger, hookimpl
from tunesmith.config import TrainConfig
from tunesmith.engine import train
from tunesmith.loggers import RunLoggers, select_loggers
from tunesmith.plugins import create_plugin_manager


def train_args(tiny_model_dir, tmp_path, output_dir, *extra):
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(8))
    return [
        "sft", "--model", tiny_model_dir, "--dataset", data, "--eval-dataset", data, "--output-dir", output_dir,
        "--precision", "fp32", "--save-steps", "0", "--max-steps", "3", "--eval-steps", "2", *extra,
    ]


def test_report_to_tensorboard_writes_the_scalars_of_metrics_jsonl_and_curves_png(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("TUNESMITH_CURVES", "1")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    output = tmp_path / "run"
    assert run_cli(*train_args(tiny_model_dir, tmp_path, output, "--report-to", "tensorboard")) == 0
    lines = read_metrics(output)
    assert any("eval_loss" in line for line in lines)

    events = EventAccumulator(str(output / "runs"), size_guidance={"scalars": 0}).Reload()
    numeric = {key for line in lines for key, value in line.items() if key != "step" and isinstance(value, (int, float))}
    assert {"loss", "eval_loss", "learning_rate", "grad_norm", "epoch"} <= numeric
    assert numeric <= set(events.Tags()["scalars"])
    for key in numeric:
        expected = [(line["step"], float(line[key])) for line in lines if isinstance(line.get(key), (int, float))]
        logged = [(event.step, event.value) for event in events.Scalars(key)]
        assert [step for step, _ in logged] == [step for step, _ in expected], key
        assert [value for _, value in logged] == pytest.approx([value for _, value in expected], rel=1e-6), key
    assert (output / "curves.png").read_bytes().startswith(b"\x89PNG")


class RecordingLogger(MetricsLogger):
    calls: list = []

    def start(self, config, output_dir, step=0):
        self.calls.append(("start", config, output_dir, step))

    def log(self, record):
        self.calls.append(("log", dict(record)))

    def finish(self):
        self.calls.append(("finish",))


class LoggerPlugin:
    def __init__(self, *specs):
        self.specs = list(specs)

    @hookimpl
    def tunesmith_register_loggers(self):
        return self.specs


def test_a_plugin_logger_receives_the_config_once_and_every_metrics_line(tiny_model_dir, tmp_path):
    RecordingLogger.calls = []
    manager = create_plugin_manager()
    manager.register(LoggerPlugin(LoggerSpec("recording", RecordingLogger, "records calls")), "recording-plugin")
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(8))
    output = tmp_path / "run"
    config = TrainConfig(model=str(tiny_model_dir), dataset=(str(data),), eval_dataset=(str(data),), output_dir=str(output),
                         precision="fp32", save_steps=0, max_steps=2, eval_steps=2, report_to=("recording",))
    train("sft", config, manager=manager)

    calls = RecordingLogger.calls
    assert [call[0] for call in calls] == ["start"] + ["log"] * (len(calls) - 2) + ["finish"]
    _, started_with, output_dir, step = calls[0]
    assert started_with == config.to_dict() and started_with["report_to"] == ["recording"]
    assert (output_dir, step) == (output, 0)
    lines = read_metrics(output)
    assert [json.loads(json.dumps(call[1])) for call in calls[1:-1]] == lines
    assert [sorted(line)[:2] for line in lines] == [["device", "epoch"]] * 3
    assert ["eval_loss" in line for line in lines] == [False, False, True]  # two training lines, then the evaluation


def test_an_unknown_report_to_fails_before_training_naming_the_installed_loggers(tiny_model_dir, tmp_path, capsys):
    output = tmp_path / "run"
    assert run_cli(*train_args(tiny_model_dir, tmp_path, output, "--report-to", "tensorbord")) == 2
    error = capsys.readouterr().err
    assert "--report-to tensorbord: no logger of that name is installed" in error
    assert "tensorboard" in error and "mlflow" in error and "wandb" in error and "all" in error
    assert not (output / "metrics.jsonl").exists()


def test_a_logger_whose_package_is_missing_names_the_install_and_all_leaves_it_out():
    manager = create_plugin_manager()
    manager.register(
        LoggerPlugin(LoggerSpec("needs-missing", RecordingLogger, requires=("tunesmith_no_such_module",))), "missing-plugin"
    )
    with pytest.raises(ConfigError, match="needs the tunesmith_no_such_module package.*pip install tunesmith_no_such_module"):
        select_loggers(manager, ["needs-missing"])
    chosen = [registered.spec.name for registered in select_loggers(manager, ["all"])]
    assert chosen[0] == "jsonl" and "needs-missing" not in chosen and "tensorboard" in chosen
    assert [registered.spec.name for registered in select_loggers(manager, ["none"])] == ["jsonl"]


def write_metrics(run_dir: Path, lines: list[dict]) -> Path:
    run_dir.mkdir(parents=True)
    write_jsonl(run_dir / "metrics.jsonl", lines)
    return run_dir


def colour_pixels(image, hex_colour: str) -> int:
    """How many pixels of the PNG are (within rounding) this colour."""
    import numpy as np
    from matplotlib.colors import to_rgb

    return int((np.abs(image[..., :3] - np.array(to_rgb(hex_colour))).max(axis=-1) < 0.02).sum())


def test_plot_overlays_two_runs_in_their_own_colours(tmp_path, capsys):
    from matplotlib.image import imread

    def lines(scale, reward):
        for step in range(1, 11):
            line = {"step": step, "loss": scale / step, "learning_rate": 1e-4 * (1 - step / 10), "device": "cpu"}
            if reward:
                line["reward"] = step / 10
            yield line
            if step % 5 == 0:
                yield {"step": step, "eval_loss": scale / step + 0.1, "device": "cpu"}

    first = write_metrics(tmp_path / "first", list(lines(2.0, reward=False)))
    second = write_metrics(tmp_path / "second", list(lines(3.0, reward=True)))
    output = tmp_path / "plots" / "both.png"
    assert run_cli("plot", first, second, "--output", output) == 0
    assert str(output) in capsys.readouterr().out
    image = imread(output)
    blue, orange = colour_pixels(image, "#1f77b4"), colour_pixels(image, "#ff7f0e")  # matplotlib's C0 and C1
    assert blue > 200 and orange > 200
    # The reward panel has the second run only: more orange than blue overall.
    assert orange > blue

    assert run_cli("plot", first, "--output", tmp_path / "first.png") == 0
    assert colour_pixels(imread(tmp_path / "first.png"), "#ff7f0e") == 0


def test_plot_of_a_folder_without_metrics_says_so(tmp_path, capsys):
    assert run_cli("plot", tmp_path, "--output", tmp_path / "x.png") == 2
    assert "no metrics.jsonl here" in capsys.readouterr().err


class FailingLogger(RecordingLogger):
    def log(self, record):
        raise OSError("tracker is down")

    def finish(self):
        self.calls.append(("finish", "failing"))
        raise OSError("still down")


def test_every_started_logger_finishes_when_the_run_fails(tmp_path, capsys):
    RecordingLogger.calls = []
    loggers = RunLoggers([("recording", RecordingLogger()), ("failing", FailingLogger())], tmp_path, write_curves=False)
    with pytest.raises(OSError, match="tracker is down"):
        with loggers.run({"learning_rate": 1e-4}, step=0):
            loggers.log({"step": 1, "loss": 1.0})
    assert [call[0] for call in RecordingLogger.calls] == ["start", "start", "log", "finish", "finish"]
    assert "the failing logger failed to finish: OSError('still down')" in capsys.readouterr().err


TRACKER_LINES = [{"step": 1, "loss": 2.5, "learning_rate": 1e-4, "device": "cpu", "memory_peak_bytes": None},
                 {"step": 1, "eval_loss": 2.75}, {"step": 2, "loss": 2.0, "learning_rate": 5e-5, "rewards/length": 0.5}]


def test_report_to_mlflow_keeps_the_run_in_a_local_store_under_the_output_folder(tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="mlflow is an optional extra (pip install 'tunesmith[mlflow]')")
    from mlflow.tracking import MlflowClient

    from tunesmith.loggers.mlflow import MLflowLogger

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    lines = TRACKER_LINES
    logger = MLflowLogger()
    logger.start({"learning_rate": 1e-4, "dataset": ["a.jsonl"]}, tmp_path, 0)
    for line in lines:
        logger.log(line)
    logger.finish()

    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("tunesmith").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == tmp_path.name
    assert run.data.params["learning_rate"] == "0.0001"
    for key in ("loss", "learning_rate", "eval_loss", "rewards/length"):
        expected = [(line["step"], line[key]) for line in lines if key in line]
        assert [(metric.step, metric.value) for metric in client.get_metric_history(run.info.run_id, key)] == expected
    assert "device" not in run.data.metrics and "memory_peak_bytes" not in run.data.metrics


def test_without_matplotlib_a_run_says_once_how_to_get_curves_and_plot_refuses(tmp_path, monkeypatch, capsys):
    from tunesmith import curves

    monkeypatch.setenv("TUNESMITH_CURVES", "1")
    monkeypatch.setattr(curves, "matplotlib_installed", lambda: False)
    monkeypatch.setattr(curves, "_said_missing", False)
    run_dir = write_metrics(tmp_path / "run", [{"step": 1, "loss": 1.0}])
    curves.write_run_curves(run_dir)
    curves.write_run_curves(run_dir)
    assert capsys.readouterr().err.count("pip install matplotlib") == 1
    assert not (run_dir / "curves.png").exists()
    assert run_cli("plot", run_dir) == 2
    assert "tunesmith plot draws with matplotlib, which is not installed here; pip install matplotlib" in capsys.readouterr().err


def test_a_resumed_run_replaces_tensorboard_steps_after_its_checkpoint(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tunesmith.loggers.tensorboard import TensorBoardLogger

    first = TensorBoardLogger()
    first.start({}, tmp_path, 0)
    for step in (1, 2, 3):
        first.log({"step": step, "loss": float(step), "device": "cpu"})
    first.finish()
    resumed = TensorBoardLogger()  # as a run resumed from checkpoint-2 does
    resumed.start({}, tmp_path, 2)
    resumed.log({"step": 3, "loss": 30.0})
    resumed.finish()
    events = EventAccumulator(str(tmp_path / "runs")).Reload()
    assert [(event.step, event.value) for event in events.Scalars("loss")] == [(1, 1.0), (2, 2.0), (3, 30.0)]


def wandb_records(path: Path):
    """The protobuf records of a wandb run file, read independently of wandb (which has no
    Python reader since its core moved to Go): a 7-byte ``:W&B`` header, then LevelDB log
    blocks of 32 KiB, each record a 7-byte header (crc, length, type) and its bytes, split
    across blocks as FIRST/MIDDLE/LAST pieces."""
    import struct

    from wandb.proto import wandb_internal_pb2

    block, full, last = 32 * 1024, 1, 4
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    offset, pending = 7, b""
    while offset + 7 <= len(data):
        if block - offset % block < 7:
            offset += block - offset % block
            continue
        _, length, kind = struct.unpack_from("<IHB", data, offset)
        pending += data[offset + 7 : offset + 7 + length]
        offset += 7 + length
        if kind in (full, last):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record
            pending = b""


def test_report_to_wandb_offline_keeps_the_metrics_and_config_in_the_run_folder(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is an optional extra (pip install 'tunesmith[wandb]')")
    from tunesmith.loggers.wandb import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    for variable in ("WANDB_PROJECT", "WANDB_NAME", "WANDB_DIR"):
        monkeypatch.delenv(variable, raising=False)
    logger = WandbLogger()
    logger.start({"learning_rate": 1e-4, "dataset": ["a.jsonl"]}, tmp_path, 0)
    for line in TRACKER_LINES:
        logger.log(line)
    logger.finish()

    (run_file,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    history, config, runs = [], {}, []
    for record in wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item})
        elif kind == "run":
            runs.append((record.run.project, record.run.display_name))
            config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})
    assert ("tunesmith", tmp_path.name) in runs
    assert config["learning_rate"] == 1e-4 and config["dataset"] == ["a.jsonl"]
    rows = {row["_step"]: row for row in history}
    assert sorted(rows) == [1, 2]
    for key in ("loss", "learning_rate", "eval_loss", "rewards/length"):
        expected = [(line["step"], line[key]) for line in TRACKER_LINES if key in line]
        assert [(step, rows[step][key]) for step, _ in expected] == expected, key
    assert not any("device" in row or "memory_peak_bytes" in row for row in history)


TRACKIO_RUN = """
import json, sys
from pathlib import Path
from tunesmith.loggers.trackio import TrackioLogger
from trackio.sqlite_storage import SQLiteStorage

output, lines = Path(sys.argv[1]), json.loads(sys.argv[2])
for start, logged in ((0, lines), (1, [{"step": 2, "loss": 1.5}])):  # a run, then its resumption
    logger = TrackioLogger()
    logger.start({"learning_rate": 1e-4}, output, start)
    for line in logged:
        logger.log(line)
    logger.finish()
runs = SQLiteStorage.get_run_records("tunesmith")
print("RESULT", json.dumps({
    "names": [run["name"] for run in runs],
    "logs": SQLiteStorage.get_logs("tunesmith", run_id=runs[0]["id"]),
    "config": SQLiteStorage.get_run_config("tunesmith", output.name),
}))
"""


def test_report_to_trackio_keeps_the_metrics_in_its_local_database_and_a_resumed_run_continues_it(tmp_path):
    pytest.importorskip("trackio", reason="trackio is an optional extra (pip install 'tunesmith[trackio]')")
    import os
    import subprocess
    import sys

    # Trackio fixes its folder when first imported: a process of its own sees TRACKIO_DIR.
    env = {**os.environ, "TRACKIO_DIR": str(tmp_path / "trackio")}
    env.pop("TRACKIO_PROJECT", None)
    env.pop("TRACKIO_SPACE_ID", None)
    output = tmp_path / "my-run"
    output.mkdir()
    done = subprocess.run([sys.executable, "-c", TRACKIO_RUN, str(output), json.dumps(TRACKER_LINES)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    (result,) = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]  # among trackio's messages
    found = json.loads(result.removeprefix("RESULT "))
    assert found["names"] == ["my-run"]
    assert found["config"]["learning_rate"] == 1e-4
    logged = [(row["step"], key, row[key]) for row in found["logs"] for key in row if key not in ("step", "timestamp")]
    expected = [(line["step"], key, value) for line in TRACKER_LINES + [{"step": 2, "loss": 1.5}]
                for key, value in line.items() if key not in ("step", "device", "memory_peak_bytes")]
    assert logged == expected
