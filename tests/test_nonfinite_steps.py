"""A non-finite loss or gradient skips the step without touching parameters and is counted;
too many in a row stop the run; an fp16 overflow only lowers the loss scale."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import TrainerPlugin, adapter_weights, chat_rows, read_metrics, write_jsonl
from tunesmith.config import TrainConfig
from tunesmith.engine import train
from tunesmith.errors import TrainingError
from tunesmith.plugins import create_plugin_manager
from tunesmith_trainers.sft import SFTTrainer


def nan_loss(loss, model):
    return loss * float("nan")


def nan_gradient(loss, model):
    """Keeps the loss finite but makes its gradient NaN: sqrt has an infinite slope at 0."""
    anchor = next(p for p in model.parameters() if p.requires_grad)
    return loss + torch.sqrt(anchor.sum() * 0)


def overflowing_loss(loss, model):
    """A finite loss so large that its fp16-scaled gradient overflows."""
    return loss * 1e36


class SabotagedSFT(SFTTrainer):
    """SFT whose loss goes through ``sabotage`` on the listed optimizer steps (one micro-batch per step)."""

    sabotage = staticmethod(nan_loss)
    steps: set[int] = set()
    calls = 0

    def compute_loss(self, model, batch):
        SabotagedSFT.calls += 1
        output = super().compute_loss(model, batch)
        if SabotagedSFT.calls in self.steps:
            output.loss = self.sabotage(output.loss, model)
        return output


def run(tmp_path, tiny_model_dir, sabotage, steps, precision="fp32", **options):
    SabotagedSFT.sabotage, SabotagedSFT.steps, SabotagedSFT.calls = staticmethod(sabotage), set(steps), 0
    manager = create_plugin_manager()
    manager.register(TrainerPlugin("sabotaged", SabotagedSFT), "sabotaged")
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(4))
    config = TrainConfig(model=str(tiny_model_dir), dataset=(str(data),), output_dir=str(tmp_path / "run"),
                         precision=precision, batch_size=4, save_steps=1, lora_dropout=0.0, **options)
    train("sabotaged", config, manager=manager)
    return tmp_path / "run"


def assert_unchanged(first, second):
    assert all(torch.equal(first[key], second[key]) for key in first)


def test_a_nan_step_is_skipped_and_counted(tmp_path, tiny_model_dir):
    output = run(tmp_path, tiny_model_dir, nan_loss, steps={2}, max_steps=3)
    after_1, after_2, after_3 = (adapter_weights(output / f"checkpoint-{n}") for n in (1, 2, 3))
    assert_unchanged(after_1, after_2)
    assert any(not torch.equal(after_2[key], after_3[key]) for key in after_2)
    assert [m["skipped_steps"] for m in read_metrics(output)] == [0, 1, 1]


def test_too_many_bad_steps_in_a_row_stop_the_run(tmp_path, tiny_model_dir):
    with pytest.raises(TrainingError, match="3 steps in a row.*checkpoint"):
        run(tmp_path, tiny_model_dir, nan_loss, steps={2, 3, 4, 5, 6}, max_steps=8, max_bad_steps=3)
    output = tmp_path / "run"
    assert not (output / "final").exists()
    assert_unchanged(adapter_weights(output / "checkpoint-1"), adapter_weights(output / "checkpoint-3"))


def test_a_finite_loss_with_a_nan_gradient_is_skipped(tmp_path, tiny_model_dir):
    output = run(tmp_path, tiny_model_dir, nan_gradient, steps={2}, max_steps=3)
    assert_unchanged(adapter_weights(output / "checkpoint-1"), adapter_weights(output / "checkpoint-2"))
    lines = read_metrics(output)
    assert [line["skipped_steps"] for line in lines] == [0, 1, 1]
    assert all(isinstance(line["loss"], float) for line in lines)  # the loss itself stayed finite


def test_fp16_survives_a_non_finite_step(tmp_path, tiny_model_dir):
    output = run(tmp_path, tiny_model_dir, nan_loss, steps={2}, max_steps=4, precision="fp16")
    lines = read_metrics(output)
    assert [line["step"] for line in lines] == [1, 2, 3, 4]
    assert lines[-1]["skipped_steps"] >= 1


def test_fp16_overflow_is_skipped_without_counting_as_a_bad_step(tmp_path, tiny_model_dir):
    # One counted bad step would stop this run.
    output = run(tmp_path, tiny_model_dir, overflowing_loss, steps={2, 3}, max_steps=4, precision="fp16", max_bad_steps=1)
    lines = read_metrics(output)
    assert [line["skipped_steps"] for line in lines] == [0, 1, 2, 2]
    assert all(isinstance(line["loss"], float) for line in lines)


@pytest.mark.parametrize(
    ("losses", "said"),
    [([1.27, 10.8], True), ([2.0, 1.1], False), ([2.0, 2.4], False), ([0.01, 0.2], False), ([-0.1, 0.6], False), ([1.5], False)],
)
def test_a_run_whose_loss_rose_well_above_its_start_ends_with_a_learning_rate_hint(losses, said):
    from tunesmith.engine import rising_loss_hint

    hint = rising_loss_hint(losses, 1e3)
    assert bool(hint) == said
    if said:
        assert "rose from 1.2700 to 10.8000" in hint and "--learning-rate too high (1000)" in hint


def tripled_loss(loss, model):
    return loss * 3


def test_a_run_whose_last_logged_loss_is_well_above_its_first_ends_with_the_hint(tmp_path, tiny_model_dir, capsys):
    output = run(tmp_path, tiny_model_dir, tripled_loss, steps={3}, max_steps=3)
    first, _, last = (line["loss"] for line in read_metrics(output))
    assert f"note: the training loss rose from {first:.4f} to {last:.4f}" in capsys.readouterr().out
