"""`tunesmith grpo --generation-backend vllm`, end to end, resumed from a checkpoint.

Full fine-tuning, so that every weight reaches the engine after each update; the KL penalty and
two updates per generation, so that a checkpoint falls between a generation's updates. A run
resumed from the checkpoint of its second step ends with the weights and rewards of the run that
wrote it: the engine's sampling follows tunesmith's generator, and the engine leaves the
training's global random generators as they were. (That a killed run resumes from its newest
checkpoint is the core's, tested with the built-in backends.)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

from safetensors.torch import load_file

PROMPTS = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(3) for b in range(3)]
REWARD = (
    "def short_digits(prompts, completions, answer, **columns):\n"
    "    return [sum(ch.isdigit() for ch in c) - 0.1 * len(c) for c in completions]\n"
)


def command(model_dir, output):
    return [
        sys.executable, "-m", "tunesmith", "grpo", "--model", str(model_dir), "--dataset", "sums.jsonl",
        "--output-dir", str(output), "--generation-backend", "vllm", "--adapter", "full", "--precision", "fp32",
        "--reward", "rewards:short_digits", "--num-generations", "4", "--batch-size", "4", "--grad-accum", "2",
        "--max-completion-length", "6", "--learning-rate", "1e-3", "--max-steps", "4", "--save-steps", "2",
        "--num-iterations", "2", "--beta", "0.05",
    ]


def test_a_vllm_grpo_run_resumed_from_its_checkpoint_ends_bit_identical(tiny_model_dir, tmp_path):
    (tmp_path / "sums.jsonl").write_text("".join(json.dumps(row) + "\n" for row in PROMPTS), encoding="utf-8")
    (tmp_path / "rewards.py").write_text(REWARD, encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "TUNESMITH_PLUGINS": "tunesmith-vllm"}

    whole = subprocess.run(command(tiny_model_dir, tmp_path / "whole"), capture_output=True, text=True, env=env, cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr[-3000:]

    output = tmp_path / "resumed"
    output.mkdir()
    shutil.copytree(tmp_path / "whole" / "checkpoint-2", output / "checkpoint-2")
    resumed_run = subprocess.run(command(tiny_model_dir, output), capture_output=True, text=True, env=env, cwd=tmp_path)
    assert resumed_run.returncode == 0, resumed_run.stderr[-3000:]
    assert "resuming from" in resumed_run.stdout
    expected, resumed = load_file(tmp_path / "whole" / "final" / "model.safetensors"), load_file(output / "final" / "model.safetensors")
    initial = load_file(tiny_model_dir / "model.safetensors")
    assert expected.keys() == resumed.keys()
    assert any(not (expected[key] == initial[key]).all() for key in expected)  # the run trained
    for key in expected:
        assert (expected[key] == resumed[key]).all(), key
    assert rewards(output) == [logged for logged in rewards(tmp_path / "whole") if logged[0] > 2] != []


def rewards(output) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [(row["step"], row["reward"]) for row in rows if "reward" in row]
