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


# -- a device without float64 (Apple's MPS) -------------------------------------------------------


@pytest.fixture
def without_float64(monkeypatch):
    """This process's CPU refuses float64 tensors as MPS does, for ``widest_float``'s probe."""
    from tunesmith import device

    real_empty = torch.empty

    def empty(*size, dtype=None, device=None, **kwargs):
        if dtype == torch.float64:
            raise TypeError("Cannot convert a MPS Tensor to float64 dtype as the MPS framework doesn't support float64.")
        return real_empty(*size, dtype=dtype, device=device, **kwargs)

    device.widest_float.cache_clear()
    monkeypatch.setattr(torch, "empty", empty)
    yield
    device.widest_float.cache_clear()


def test_sums_are_float64_where_the_device_has_it():
    from tunesmith.device import widest_float
    from tunesmith.engine import move_to, summed

    cpu = torch.device("cpu")
    assert widest_float(cpu) == torch.float64
    assert summed([1.0, torch.tensor(2.0, dtype=torch.bfloat16)], cpu).dtype == torch.float64
    assert move_to({"logps": torch.zeros(2, dtype=torch.float64)}, cpu)["logps"].dtype == torch.float64


def test_a_device_without_float64_gets_float32_sums_and_batches(without_float64):
    from tunesmith.device import widest_float
    from tunesmith.engine import move_to, summed

    cpu = torch.device("cpu")
    assert widest_float(cpu) == torch.float32
    total = summed([1.0, torch.tensor(2.0, dtype=torch.bfloat16), torch.tensor([3.0])], cpu)
    assert total.dtype == torch.float32 and total.item() == 6.0
    batch = move_to({"reference_logps": torch.tensor([-1.5], dtype=torch.float64), "input_ids": torch.ones(1, 2, dtype=torch.long),
                     "note": "kept"}, cpu)
    assert batch["reference_logps"].dtype == torch.float32 and batch["reference_logps"].item() == -1.5
    assert batch["input_ids"].dtype == torch.long and batch["note"] == "kept"
