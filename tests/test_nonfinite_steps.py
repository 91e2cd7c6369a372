"""A non-finite loss skips the step without touching parameters; too many in a row stop the run."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import adapter_weights, chat_rows, read_metrics, write_jsonl
from tunesmith.config import TrainConfig
from tunesmith.engine import train
from tunesmith.errors import TrainingError
from tunesmith.hooks import hookimpl
from tunesmith.plugins import create_plugin_manager
from tunesmith.records import TrainerSpec
from tunesmith_trainers.sft import SFTTrainer


class PoisonedSFT(SFTTrainer):
    """SFT whose loss is NaN on the optimizer steps listed in ``poisoned_steps`` (1-based)."""

    poisoned_steps: set[int] = set()
    calls = 0

    def compute_loss(self, model, batch):
        PoisonedSFT.calls += 1
        output = super().compute_loss(model, batch)
        if PoisonedSFT.calls in self.poisoned_steps:
            output.loss = output.loss * float("nan")
        return output


class PoisonPlugin:
    @hookimpl
    def tunesmith_register_trainers(self):
        return [TrainerSpec(name="poisoned", trainer=PoisonedSFT)]


def run(tmp_path, tiny_model_dir, poisoned, precision="fp32", **options):
    PoisonedSFT.poisoned_steps, PoisonedSFT.calls = set(poisoned), 0
    manager = create_plugin_manager()
    manager.register(PoisonPlugin(), "poison")
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(4))
    config = TrainConfig(model=str(tiny_model_dir), dataset=(str(data),), output_dir=str(tmp_path / "run"),
                         precision=precision, batch_size=4, save_steps=1, lora_dropout=0.0, **options)
    return train("poisoned", config, manager=manager)


def test_a_nan_step_is_skipped_and_counted(tmp_path, tiny_model_dir):
    run(tmp_path, tiny_model_dir, poisoned={2}, max_steps=3)
    output = tmp_path / "run"
    after_1, after_2, after_3 = (adapter_weights(output / f"checkpoint-{n}") for n in (1, 2, 3))
    for key in after_1:
        assert torch.equal(after_1[key], after_2[key]), key
    assert any(not torch.equal(after_2[key], after_3[key]) for key in after_2)
    assert [m["skipped_steps"] for m in read_metrics(output)] == [0, 1, 1]


def test_too_many_bad_steps_in_a_row_stop_the_run(tmp_path, tiny_model_dir):
    with pytest.raises(TrainingError, match="3 steps in a row.*checkpoint"):
        run(tmp_path, tiny_model_dir, poisoned={2, 3, 4, 5, 6}, max_steps=8, max_bad_steps=3)
    output = tmp_path / "run"
    assert not (output / "final").exists()
    good = adapter_weights(output / "checkpoint-1")
    last = adapter_weights(output / "checkpoint-3")
    assert all(torch.equal(good[key], last[key]) for key in good)


class PoisonedGradientSFT(SFTTrainer):
    """A finite loss whose gradient is NaN on the listed steps: sqrt has an infinite slope at 0."""

    poisoned_steps: set[int] = set()
    calls = 0

    def compute_loss(self, model, batch):
        PoisonedGradientSFT.calls += 1
        output = super().compute_loss(model, batch)
        if PoisonedGradientSFT.calls in self.poisoned_steps:
            anchor = next(p for p in model.parameters() if p.requires_grad)
            output.loss = output.loss + torch.sqrt(anchor.sum() * 0)
        return output


class GradientPoisonPlugin:
    @hookimpl
    def tunesmith_register_trainers(self):
        return [TrainerSpec(name="poisoned-gradient", trainer=PoisonedGradientSFT)]


def test_a_finite_loss_with_a_nan_gradient_is_skipped(tmp_path, tiny_model_dir):
    PoisonedGradientSFT.poisoned_steps, PoisonedGradientSFT.calls = {2}, 0
    manager = create_plugin_manager()
    manager.register(GradientPoisonPlugin(), "gradient-poison")
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(4))
    config = TrainConfig(model=str(tiny_model_dir), dataset=(str(data),), output_dir=str(tmp_path / "run"),
                         precision="fp32", batch_size=4, save_steps=1, lora_dropout=0.0, max_steps=3)
    train("poisoned-gradient", config, manager=manager)
    output = tmp_path / "run"
    after_1, after_2 = adapter_weights(output / "checkpoint-1"), adapter_weights(output / "checkpoint-2")
    assert all(torch.equal(after_1[key], after_2[key]) for key in after_1)
    lines = read_metrics(output)
    assert [line["skipped_steps"] for line in lines] == [0, 1, 1]
    assert all(isinstance(line["loss"], float) for line in lines)  # the loss itself stayed finite


def test_fp16_survives_a_non_finite_step(tmp_path, tiny_model_dir):
    run(tmp_path, tiny_model_dir, poisoned={2}, max_steps=4, precision="fp16")
    lines = read_metrics(tmp_path / "run")
    assert [line["step"] for line in lines] == [1, 2, 3, 4]
    assert lines[-1]["skipped_steps"] >= 1


class OverflowingSFT(SFTTrainer):
    """A finite loss so large that its fp16-scaled gradient overflows on the listed steps."""

    overflowing_steps: set[int] = set()
    calls = 0

    def compute_loss(self, model, batch):
        OverflowingSFT.calls += 1
        output = super().compute_loss(model, batch)
        if OverflowingSFT.calls in self.overflowing_steps:
            output.loss = output.loss * 1e36
        return output


class OverflowPlugin:
    @hookimpl
    def tunesmith_register_trainers(self):
        return [TrainerSpec(name="overflowing", trainer=OverflowingSFT)]


def test_fp16_overflow_is_skipped_without_counting_as_a_bad_step(tmp_path, tiny_model_dir):
    OverflowingSFT.overflowing_steps, OverflowingSFT.calls = {2, 3}, 0
    manager = create_plugin_manager()
    manager.register(OverflowPlugin(), "overflow")
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(4))
    config = TrainConfig(model=str(tiny_model_dir), dataset=(str(data),), output_dir=str(tmp_path / "run"),
                         precision="fp16", batch_size=4, save_steps=0, max_steps=4, max_bad_steps=1)
    train("overflowing", config, manager=manager)  # one counted bad step would stop the run
    lines = read_metrics(tmp_path / "run")
    assert [line["skipped_steps"] for line in lines] == [0, 1, 2, 2]
    assert all(isinstance(line["loss"], float) for line in lines)
