"""The embedded default model learns: smollm2-135m with LoRA memorises a new identity."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import read_metrics, run_cli

IDENTITY = Path(__file__).resolve().parents[1] / "examples" / "demo" / "identity.jsonl"
ANSWER = "I am Tuney, a small assistant fine-tuned with tunesmith on a CPU. Ask me anything!"


@pytest.mark.slow
def test_smollm2_learns_a_handful_of_examples(tmp_path, capsys, default_model_dir):
    output = tmp_path / "run"
    code = run_cli(
        "sft", "--dataset", f"{IDENTITY}#8", "--output-dir", output, "--max-steps", "12", "--batch-size", "8",
        "--learning-rate", "1e-3", "--lora-rank", "16", "--lora-alpha", "32", "--max-length", "128",
        "--save-steps", "0", "--logging-steps", "1",
    )
    assert code == 0
    losses = [line["loss"] for line in read_metrics(output)]
    assert losses[-1] < 0.1 * losses[0], losses
    capsys.readouterr()
    assert run_cli("infer", "--adapter", output / "final", "--prompt", "Who are you?", "--max-new-tokens", "40") == 0
    assert ANSWER in capsys.readouterr().out
