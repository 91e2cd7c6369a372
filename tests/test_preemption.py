"""Preemption: SIGTERM or Ctrl-C during training finishes the step, saves a checkpoint, says how to
resume and exits 143 or 130; the same command then ends bit-identical to an uninterrupted run.
A second Ctrl-C stops at once and leaves no partial checkpoint behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import tunesmith.checkpoint as checkpoint_module
import tunesmith.engine as engine_module
import tunesmith.preemption as preemption
from tests.helpers import adapter_weights, chat_rows, read_metrics, run_cli, write_jsonl
from tunesmith.checkpoint import STEPS_FILE, list_checkpoints
from tunesmith.manifest import verify_folder
from tunesmith.preemption import StopRequests


def command(tiny_model_dir, data, output, max_steps, save_steps=4):
    return [
        "sft", "--model", str(tiny_model_dir), "--dataset", str(data), "--output-dir", str(output),
        "--max-steps", str(max_steps), "--save-steps", str(save_steps), "--batch-size", "2", "--learning-rate", "1e-3",
    ]


def assert_identical(first, second):
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


def assert_complete_checkpoint(folder):
    assert verify_folder(folder) == []
    assert (folder / STEPS_FILE).is_file()


@pytest.mark.parametrize(("first", "second"), [(signal.SIGTERM, signal.SIGINT), (signal.SIGINT, signal.SIGINT), (signal.SIGINT, signal.SIGTERM)])
def test_stop_requests_restore_the_previous_handlers_and_a_second_ctrl_c_stops_at_once(first, second, monkeypatch):
    before = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    with StopRequests() as requests:
        signal.raise_signal(first)
        signal.raise_signal(signal.SIGTERM)  # a scheduler's or launcher's copy of the first request
        assert requests.signal_number == first
        monkeypatch.setattr(preemption, "PASSED_ON_SECONDS", 0.0)  # later: a request of its own
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(second)
    assert {number: signal.getsignal(number) for number in before} == before


def test_sigterm_saves_the_step_it_stopped_at_and_the_same_command_resumes_bit_identically(tiny_model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(12))
    max_steps = 20
    reference = tmp_path / "reference"
    assert run_cli(*command(tiny_model_dir, data, reference, max_steps)) == 0

    output = tmp_path / "stopped"
    argv = [sys.executable, "-m", "tunesmith", *command(tiny_model_dir, data, output, max_steps)]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (output / "checkpoint-4").is_dir():
        assert process.poll() is None, process.stderr.read()
        assert time.monotonic() < deadline, "the run never wrote its first checkpoint"
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr
    assert not (output / "final").exists(), "the run finished before it could be stopped"
    step, newest = list_checkpoints(output)[-1]
    assert 4 <= step < max_steps
    assert_complete_checkpoint(newest)
    assert f"stopped by SIGTERM after step {step} of {max_steps}; saved {newest}" in stderr
    assert "Run the same command again to resume" in stderr
    assert read_metrics(output)[-1]["step"] == step

    capsys.readouterr()
    assert run_cli(*command(tiny_model_dir, data, output, max_steps)) == 0
    assert f"resuming from {newest}" in capsys.readouterr().out
    assert_identical(adapter_weights(reference / "final"), adapter_weights(output / "final"))


def ctrl_c_at_step(monkeypatch, step: int) -> None:
    """Press Ctrl-C while the loop makes optimizer step ``step``."""
    real = engine_module.accumulate_gradients
    calls = []

    def accumulate_then_interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) == step:
            signal.raise_signal(signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(engine_module, "accumulate_gradients", accumulate_then_interrupt)


def test_ctrl_c_finishes_the_step_then_saves_and_exits_130(tiny_model_dir, tmp_path, monkeypatch, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(8))
    output = tmp_path / "run"
    ctrl_c_at_step(monkeypatch, 3)
    before = signal.getsignal(signal.SIGINT)
    assert run_cli(*command(tiny_model_dir, data, output, 8, save_steps=2)) == 130
    err = capsys.readouterr().err
    assert f"stopped by Ctrl-C (SIGINT) after step 3 of 8; saved {output / 'checkpoint-3'}" in err
    assert [step for step, _ in list_checkpoints(output)] == [2, 3]
    assert_complete_checkpoint(output / "checkpoint-3")
    assert signal.getsignal(signal.SIGINT) is before  # the loop's handlers are gone


def test_a_second_ctrl_c_while_saving_stops_at_once_leaving_the_previous_checkpoint(tiny_model_dir, tmp_path, monkeypatch, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(8))
    output = tmp_path / "run"
    ctrl_c_at_step(monkeypatch, 3)
    real_save = torch.save

    def impatient_save(obj, path, *args, **kwargs):
        if "checkpoint-3" in str(path):
            signal.raise_signal(signal.SIGINT)
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module.torch, "save", impatient_save)
    assert run_cli(*command(tiny_model_dir, data, output, 8, save_steps=2)) == 130
    assert "aborted" in capsys.readouterr().err
    assert [path.name for path in output.iterdir() if "checkpoint" in path.name] == ["checkpoint-2"]
    assert_complete_checkpoint(output / "checkpoint-2")


def test_sigterm_to_the_launcher_stops_both_ddp_processes_after_the_same_step(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(12))
    output = tmp_path / "ddp"
    argv = [
        sys.executable, "-m", "tunesmith", *command(tiny_model_dir, data, output, 200, save_steps=0),
        "--strategy", "ddp", "--nproc-per-node", "2", "--batch-size", "1",
    ]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while not (output / "metrics.jsonl").is_file():
        assert process.poll() is None, process.stderr.read()
        assert time.monotonic() < deadline, "the job never finished its first step"
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr
    [(step, newest)] = list_checkpoints(output)  # --save-steps 0: the stop alone wrote it
    assert f"stopped by SIGTERM after step {step} of 200; saved {newest}" in stderr
    # Written together: each process saved its own generator state into the one checkpoint of that step.
    assert_complete_checkpoint(newest)
    assert {path.name for path in newest.glob("rng_state-rank*.pt")} == {"rng_state-rank0.pt", "rng_state-rank1.pt"}
    assert read_metrics(output)[-1]["step"] == step
