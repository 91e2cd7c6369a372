"""An exception nobody expected ends in one paragraph on the terminal and the full traceback in
``OUTPUT/error.log``."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers import chat_rows, run_cli, write_jsonl

BROKEN_TRAINER = """
import sys
from tunesmith_trainers.sft import SFTTrainer

def compute_loss(self, model, batch):
    raise RuntimeError("boom inside a trainer")

SFTTrainer.compute_loss = compute_loss
from tunesmith.cli import main
main(sys.argv[1:])
"""


def test_an_unexpected_exception_in_a_trainer_is_one_paragraph_and_a_log(tiny_model_dir, tmp_path):
    script = tmp_path / "broken_trainer.py"
    script.write_text(BROKEN_TRAINER)
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(4))
    output = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, str(script), "sft", "--model", str(tiny_model_dir), "--dataset", str(data), "--output-dir", str(output),
         "--max-steps", "1"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0
    assert "error: unexpected RuntimeError: boom inside a trainer" in result.stderr
    assert f"the full traceback is in {output / 'error.log'}" in result.stderr
    assert "Traceback" not in result.stderr
    log = (output / "error.log").read_text()
    assert "Traceback" in log and "boom inside a trainer" in log and "compute_loss" in log


def test_an_unexpected_exception_in_any_other_command_is_logged_under_the_cache(tmp_path, monkeypatch, capsys):
    import tunesmith.models as models

    def broken_loader(*args, **kwargs):
        raise KeyError("boom inside a loader")

    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "load_for_inference", broken_loader)
    assert run_cli("infer", "--model", tmp_path, "--prompt", "hi") == 1
    message = capsys.readouterr().err.splitlines()[-1]
    assert message.startswith("error: unexpected KeyError: 'boom inside a loader'. This is a bug"), message
    (log,) = (tmp_path / "cache" / "logs").glob("error-*.log")
    assert f"the full traceback is in {log}" in message
    assert "Traceback" in log.read_text() and "broken_loader" in log.read_text()


HARDWARE_ERROR = """
import sys
from tunesmith.devices.cpu import CPUDevice
from tunesmith_trainers.sft import SFTTrainer

def compute_loss(self, model, batch):
    raise NotImplementedError("the operator 'aten::fancy' is not implemented here")

def explain_error(self, error):
    if "aten::fancy" in str(error):
        return "device 'cpu' lacks the operator aten::fancy; set FANCY_FALLBACK=1 to run it elsewhere."
    return None

SFTTrainer.compute_loss = compute_loss
CPUDevice.explain_error = explain_error
from tunesmith.cli import main
main(sys.argv[1:])
"""


def test_an_error_the_device_can_explain_is_shown_as_its_explanation(tiny_model_dir, tmp_path):
    script = tmp_path / "hardware_error.py"
    script.write_text(HARDWARE_ERROR)
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(4))
    output = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, str(script), "sft", "--model", str(tiny_model_dir), "--dataset", str(data), "--output-dir", str(output),
         "--max-steps", "1"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 1
    assert "error: device 'cpu' lacks the operator aten::fancy; set FANCY_FALLBACK=1 to run it elsewhere." in result.stderr
    assert "unexpected" not in result.stderr and not (output / "error.log").exists()
