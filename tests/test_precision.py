"""The engine runs each trainer's loss under the autocast the resolved precision asks for."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import TrainerPlugin, chat_rows, write_jsonl
from tunesmith.config import TrainConfig
from tunesmith.engine import train
from tunesmith.plugins import create_plugin_manager
from tunesmith_trainers.sft import SFTTrainer


class AutocastProbeSFT(SFTTrainer):
    """Records the autocast state the engine runs the loss under."""

    seen: list = []

    def compute_loss(self, model, batch):
        AutocastProbeSFT.seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return super().compute_loss(model, batch)


@pytest.mark.parametrize(("precision", "expected"), [("fp32", (False, None)), ("bf16", (True, torch.bfloat16)), ("fp16", (True, torch.float16))])
def test_the_loss_runs_under_the_requested_precision(tmp_path, tiny_model_dir, precision, expected):
    AutocastProbeSFT.seen = []
    manager = create_plugin_manager()
    manager.register(TrainerPlugin("autocast-probe", AutocastProbeSFT), "autocast-probe")
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(4))
    config = TrainConfig(model=str(tiny_model_dir), dataset=(str(data),), output_dir=str(tmp_path / "run"),
                         precision=precision, batch_size=4, save_steps=0, max_steps=1)
    result = train("autocast-probe", config, manager=manager)
    assert result.precision == precision
    enabled, dtype = AutocastProbeSFT.seen[0]
    assert enabled == expected[0]
    if expected[0]:
        assert dtype == expected[1]


def test_fp16_on_a_cpu_trains_with_a_note_saying_what_is_native(tmp_path, tiny_model_dir, capsys):
    from tests.helpers import run_cli

    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(4))
    assert run_cli("sft", "--model", tiny_model_dir, "--dataset", data, "--output-dir", tmp_path / "run", "--precision", "fp16",
                   "--max-steps", "1", "--save-steps", "0") == 0
    assert "fp16 is emulated on CPUs" in capsys.readouterr().out
