"""The embedded default model learns: smollm2-135m with LoRA memorises a new identity, and GRPO makes its sums right."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.helpers import read_metrics, run_cli, write_jsonl

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


#: sums the base model's greedy replies get right five times in eight; GRPO trains and is scored on the same rows
SUMS = [{"prompt": f"What is {a} + {b}? Answer with the number only.", "answer": str(a + b)}
        for a, b in [(3, 4), (5, 8), (7, 6), (9, 4), (6, 7), (8, 5), (4, 9), (7, 8)]]


@pytest.mark.slow
def test_grpo_raises_smollm2s_accuracy_on_small_sums(tmp_path, monkeypatch, default_model_dir):
    """GRPO with the built-in ``accuracy`` reward (the completion's final number against the
    ``answer`` column) makes smollm2-135m's greedy replies right more often, as ``tunesmith eval``
    scores them with the same reward before and after."""
    monkeypatch.setenv("TUNESMITH_PLUGINS", "rewards")  # tunesmith-rewards, installed with the tests
    data = write_jsonl(tmp_path / "sums.jsonl", SUMS)

    def greedy_accuracy(*adapter: str) -> float:
        results = tmp_path / f"eval{len(adapter)}.json"
        assert run_cli("eval", "--model", "smollm2-135m", *adapter, "--dataset", data, "--metric", "reward:accuracy",
                       "--max-new-tokens", "8", "--output", results) == 0
        return json.loads(results.read_text())["metrics"]["reward:accuracy"]["mean"]

    output = tmp_path / "grpo"
    assert run_cli("grpo", "--model", "smollm2-135m", "--dataset", data, "--output-dir", output, "--reward", "accuracy",
                   "--num-generations", "8", "--batch-size", "16", "--max-completion-length", "8", "--max-steps", "6",
                   "--learning-rate", "1e-3", "--lora-rank", "16", "--lora-alpha", "32", "--warmup-steps", "0",
                   "--save-steps", "0", "--logging-steps", "1") == 0
    before, after = greedy_accuracy(), greedy_accuracy("--adapter", str(output / "final"))
    rewards = [line["reward"] for line in read_metrics(output) if "reward" in line]
    assert after >= before + 0.25, (before, after, rewards)  # 0.625 -> 1.0 when written
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.3, rewards  # the sampled completions' reward rose too
