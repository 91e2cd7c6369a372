"""A trainer plugin gets a lifecycle: its own options (flags, YAML keys, --help), a context with
the reference model, and state kept across a resume. The trainer in ``tests/lifecycle_plugin.py``
uses only the public API, as a third party would."""

from __future__ import annotations

import pytest
import torch

import tunesmith.plugins as plugins_module
from tests.helpers import chat_rows, read_metrics, run_cli, write_jsonl
from tests.test_plugins import fake_entry_point
from tunesmith.checkpoint import TRAINER_FILE


@pytest.fixture
def echo_installed(monkeypatch):
    real = plugins_module.metadata.entry_points
    echo = fake_entry_point("echo", "tests.lifecycle_plugin", "echo-dist")
    monkeypatch.setattr(plugins_module.metadata, "entry_points", lambda group: [*real(group=group), echo])
    monkeypatch.setenv("TUNESMITH_PLUGINS", "echo-dist")


def echo(*args):
    return run_cli("echo", *map(str, args))


def test_a_trainer_option_is_a_flag_of_its_command_only(echo_installed, capsys):
    assert echo("--help") == 0
    assert "--echo-value" in capsys.readouterr().out
    assert run_cli("sft", "--help") == 0
    assert "--echo-value" not in capsys.readouterr().out


def test_a_trainer_option_from_yaml_reaches_the_trainer_and_state_survives_a_resume(echo_installed, tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(8))
    config = tmp_path / "echo.yaml"
    config.write_text(f"model: {tiny_model_dir}\ndataset: [{data}]\necho-value: 2.5\n")
    output = tmp_path / "run"
    common = ("--config", config, "--output-dir", output, "--batch-size", "2", "--save-steps", "2", "--precision", "fp32")
    assert echo(*common, "--max-steps", "2") == 0
    assert torch.load(output / "checkpoint-2" / TRAINER_FILE, weights_only=True)["batches_seen"] == 2

    assert echo(*common, "--max-steps", "4") == 0  # resumes from checkpoint-2
    metrics = [line for line in read_metrics(output) if "echo" in line]
    assert [line["echo"] for line in metrics] == [2.5] * 4
    assert [line["batches_seen"] for line in metrics] == [1.0, 2.0, 3.0, 4.0]  # counted on after the resume, not from 0


def test_with_lora_the_reference_is_the_policy_with_its_adapter_off(echo_installed, tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(8))
    output = tmp_path / "run"
    assert echo("--model", tiny_model_dir, "--dataset", data, "--output-dir", output, "--max-steps", "3", "--batch-size", "2",
                "--save-steps", "0", "--precision", "fp32", "--learning-rate", "1e-2", "--lora-dropout", "0") == 0
    metrics = read_metrics(output)
    assert all(line["reference_is_policy"] == 1.0 for line in metrics)  # no second copy of the weights
    assert metrics[0]["from_reference"] == 0.0  # LoRA starts as the identity: policy == reference
    assert metrics[-1]["from_reference"] != 0.0  # and the reference stays the base while the policy learns
