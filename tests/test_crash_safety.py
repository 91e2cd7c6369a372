"""Crash safety: a killed run, re-run with the same command, ends bit-identical to an
uninterrupted one; a crash while a checkpoint is written falls back to the previous one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import tunesmith.checkpoint as checkpoint_module
from tests.helpers import adapter_weights, chat_rows, run_cli, write_jsonl


class PowerCut(Exception):
    """Stands for the process dying in the middle of writing a file."""


def command(tiny_model_dir, data, output, max_steps, precision="fp32"):
    return [
        "sft", "--model", str(tiny_model_dir), "--dataset", str(data), "--output-dir", str(output),
        "--max-steps", str(max_steps), "--save-steps", "2", "--batch-size", "2", "--precision", precision,
        "--learning-rate", "1e-3",
    ]


def assert_identical(first, second):
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


@pytest.mark.slow
def test_sigkill_then_rerun_is_bit_identical(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(12))
    max_steps = 40
    reference = tmp_path / "reference"
    assert run_cli(*command(tiny_model_dir, data, reference, max_steps)) == 0

    output = tmp_path / "killed"
    argv = [sys.executable, "-m", "tunesmith", *command(tiny_model_dir, data, output, max_steps)]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (output / "checkpoint-4").is_dir():
        assert process.poll() is None, process.stderr.read().decode()
        assert time.monotonic() < deadline, "the run never wrote its second checkpoint"
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    assert not (output / "final").exists(), "the run finished before it could be killed"

    rerun = subprocess.run(argv, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming from" in rerun.stdout
    assert_identical(adapter_weights(reference / "final"), adapter_weights(output / "final"))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_crash_while_writing_a_checkpoint_resumes_from_the_previous_one(tiny_model_dir, tmp_path, monkeypatch, capsys, precision):
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(8))
    reference = tmp_path / "reference"
    assert run_cli(*command(tiny_model_dir, data, reference, 6, precision)) == 0

    output = tmp_path / "crashed"
    real_save = torch.save
    saves = []

    def crash_on_second_checkpoint(obj, path, *args, **kwargs):
        saves.append(path)
        if "checkpoint-4" in str(path) and len([p for p in saves if "checkpoint-4" in str(p)]) == 2:  # checkpoint-4 dies mid-write
            raise PowerCut()
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module.torch, "save", crash_on_second_checkpoint)
    assert run_cli(*command(tiny_model_dir, data, output, 6, precision)) != 0
    assert "unexpected PowerCut" in capsys.readouterr().err  # with its traceback in error.log
    monkeypatch.setattr(checkpoint_module.torch, "save", real_save)
    assert sorted(p.name for p in output.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-2"]
    # A process killed outright cannot clean up: leave the debris a SIGKILL mid-write would.
    debris = output / ".staging-checkpoint-4-99999"
    debris.mkdir()
    (debris / "optimizer.pt").write_bytes(b"PK\x03\x04 truncated")

    capsys.readouterr()
    assert run_cli(*command(tiny_model_dir, data, output, 6, precision)) == 0
    assert "resuming from" in capsys.readouterr().out and "checkpoint-2" in str(list(output.iterdir()))
    assert not any(p.name.startswith(".staging") for p in output.iterdir())
    assert_identical(adapter_weights(reference / "final"), adapter_weights(output / "final"))


def test_rotation_keeps_the_newest_checkpoints(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(4))
    output = tmp_path / "run"
    assert run_cli(*command(tiny_model_dir, data, output, 8), "--save-total-limit", "2") == 0
    assert sorted(p.name for p in output.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-6", "checkpoint-8"]


def test_checkpoints_hold_no_pickled_code(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(4))
    output = tmp_path / "run"
    assert run_cli(*command(tiny_model_dir, data, output, 2)) == 0
    folder = output / "checkpoint-2"
    for path in folder.iterdir():
        if path.suffix == ".pt":
            torch.load(path, weights_only=True)
        else:
            assert path.suffix in {".json", ".safetensors", ".md", ".jinja"}, path
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), output / "final")


def test_a_half_written_metrics_line_does_not_break_resume(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(4))
    output = tmp_path / "run"
    assert run_cli(*command(tiny_model_dir, data, output, 2)) == 0
    with open(output / "metrics.jsonl", "a") as metrics:
        metrics.write('{"step": 3, "epoch": 1.5, "lo')  # killed mid-write
    assert run_cli(*command(tiny_model_dir, data, output, 4)) == 0
    lines = (output / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4]
