"""The embedded default model learns: smollm2-135m with LoRA memorises a new identity."""

from __future__ import annotations

import json
import shutil
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
    # The base is recorded by its alias, not as this machine's cache folder, so the run folder
    # works wherever it is copied.
    assert json.loads((output / "final" / "adapter_config.json").read_text())["base_model_name_or_path"] == "smollm2-135m"
    copied = shutil.copytree(output, tmp_path / "copied-run")
    capsys.readouterr()
    assert run_cli("infer", "--adapter", copied / "final", "--prompt", "Who are you?", "--max-new-tokens", "40") == 0
    assert ANSWER in capsys.readouterr().out


def test_an_adapter_on_the_alias_records_the_alias_as_its_base(default_model_dir):
    from tunesmith.models import apply_adapter, load_model

    model = apply_adapter(load_model(default_model_dir, empty=True), "lora")
    assert model.peft_config["default"].base_model_name_or_path == "smollm2-135m"
