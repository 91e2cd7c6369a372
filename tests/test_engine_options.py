"""Engine options that change how a run proceeds: schedules, epochs, precisions, gradient
checkpointing, continued pre-training, and choosing where to resume from."""

from __future__ import annotations

import warnings

import pytest
import torch

from tests.helpers import adapter_weights, chat_rows, read_metrics, run_cli, write_jsonl


@pytest.fixture
def data_file(tmp_path):
    return write_jsonl(tmp_path / "train.jsonl", chat_rows(8))


def sft(tiny_model_dir, data_file, output, *extra):
    return run_cli("sft", "--model", tiny_model_dir, "--dataset", data_file, "--output-dir", output,
                   "--save-steps", "0", "--batch-size", "2", *extra)


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_learning_rate_schedules_warm_up_then_follow_their_shape(tiny_model_dir, data_file, tmp_path, schedule):
    output = tmp_path / schedule
    assert sft(tiny_model_dir, data_file, output, "--max-steps", "6", "--warmup-steps", "2",
               "--learning-rate", "1e-3", "--lr-scheduler", schedule, "--precision", "fp32") == 0
    # Each line logs the rate its step used; warm-up climbs linearly from 0 over two steps.
    rates = [line["learning_rate"] for line in read_metrics(output)]
    assert rates[:3] == pytest.approx([0.0, 5e-4, 1e-3])
    if schedule == "constant":
        assert rates[3:] == pytest.approx([1e-3] * 3)
    else:
        assert all(0 < later < earlier for earlier, later in zip(rates[2:], rates[3:]))


def test_epochs_set_the_number_of_steps(tiny_model_dir, data_file, tmp_path):
    output = tmp_path / "run"
    assert sft(tiny_model_dir, data_file, output, "--epochs", "2", "--grad-accum", "2", "--precision", "fp32") == 0
    lines = read_metrics(output)
    assert [line["step"] for line in lines] == [1, 2, 3, 4]  # 8 rows / 2 per batch / 2 accumulated, twice
    assert lines[-1]["epoch"] == pytest.approx(2.0)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precisions_train(tiny_model_dir, data_file, tmp_path, precision):
    output = tmp_path / precision
    assert sft(tiny_model_dir, data_file, output, "--max-steps", "3", "--precision", precision, "--learning-rate", "1e-3") == 0
    losses = [line["loss"] for line in read_metrics(output)]
    assert all(loss == loss and 0 < loss < 20 for loss in losses)


def test_gradient_checkpointing_gives_the_same_training(tiny_model_dir, data_file, tmp_path):
    plain, checkpointed = tmp_path / "plain", tmp_path / "checkpointed"
    common = ("--max-steps", "2", "--precision", "fp32", "--lora-dropout", "0", "--learning-rate", "1e-3")
    assert sft(tiny_model_dir, data_file, plain, *common) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # no deprecation notice on every run
        assert sft(tiny_model_dir, data_file, checkpointed, "--gradient-checkpointing", *common) == 0
    assert [m["loss"] for m in read_metrics(plain)] == pytest.approx([m["loss"] for m in read_metrics(checkpointed)], rel=1e-6)
    first, second = adapter_weights(plain / "final"), adapter_weights(checkpointed / "final")
    for key in first:
        torch.testing.assert_close(first[key], second[key])


def test_pt_trains_on_every_token_of_plain_text(tiny_model_dir, tmp_path):
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"text": f"Line {i} of a small corpus about tunesmith."} for i in range(6)])
    output = tmp_path / "run"
    assert run_cli("pt", "--model", tiny_model_dir, "--dataset", corpus, "--output-dir", output, "--max-steps", "2",
                   "--batch-size", "3", "--save-steps", "0", "--precision", "fp32") == 0
    assert (output / "final" / "adapter_model.safetensors").is_file()
    assert all(line["loss"] > 0 for line in read_metrics(output))


def test_resume_choices_and_refusals(tiny_model_dir, data_file, tmp_path, capsys):
    output = tmp_path / "run"
    common = ("--precision", "fp32")
    assert run_cli("sft", "--model", tiny_model_dir, "--dataset", data_file, "--output-dir", output, "--save-steps", "2",
                   "--batch-size", "2", "--max-steps", "4", *common) == 0
    capsys.readouterr()

    # A path picks the checkpoint; metrics after it are logged again, not duplicated.
    assert sft(tiny_model_dir, data_file, output, "--resume", output / "checkpoint-2", "--max-steps", "4", *common) == 0
    out = capsys.readouterr().out
    assert "resuming from" in out and "(step 2 of 4)" in out
    assert [line["step"] for line in read_metrics(output)] == [1, 2, 3, 4]

    # Starting afresh over old checkpoints would mix two runs: refused, nothing deleted.
    assert sft(tiny_model_dir, data_file, output, "--resume", "never", "--max-steps", "4", *common) != 0
    assert "--resume never" in capsys.readouterr().err
    assert (output / "checkpoint-4").is_dir()

    # A checkpoint past this run's end, or from a run with other options, is refused before loading.
    assert sft(tiny_model_dir, data_file, output, "--max-steps", "2", *common) != 0
    assert "past this run's 2 steps" in capsys.readouterr().err
    assert sft(tiny_model_dir, data_file, output, "--max-steps", "6", "--lora-rank", "4", *common) != 0
    err = capsys.readouterr().err
    assert "lora_rank: 8 in the checkpoint, 4 now" in err
    assert sft(tiny_model_dir, data_file, output, "--max-steps", "6", "--adapter", "full", *common) != 0
    assert "adapter: 'lora' in the checkpoint, 'full' now" in capsys.readouterr().err
    assert sft(tiny_model_dir, data_file, output, "--max-steps", "6", "--val-split", "0.5", *common) != 0
    assert "val_split: 0.0 in the checkpoint, 0.5 now" in capsys.readouterr().err

    assert sft(tiny_model_dir, data_file, output, "--resume", tmp_path, *common) != 0
    assert "--resume" in capsys.readouterr().err

    fresh = tmp_path / "fresh"
    assert sft(tiny_model_dir, data_file, fresh, "--resume", "never", "--max-steps", "1", *common) == 0


def test_a_longer_run_continues_on_its_own_schedule(tiny_model_dir, data_file, tmp_path):
    output = tmp_path / "run"
    common = ("--precision", "fp32", "--lr-scheduler", "linear", "--learning-rate", "1e-3")
    assert run_cli("sft", "--model", tiny_model_dir, "--dataset", data_file, "--output-dir", output, "--save-steps", "4",
                   "--batch-size", "2", "--max-steps", "4", *common) == 0
    assert sft(tiny_model_dir, data_file, output, "--max-steps", "8", *common) == 0
    rates = [line["learning_rate"] for line in read_metrics(output)]
    # Step 5 of 8 on a linear decay from 1e-3: 1e-3 * (8 - 4) / 8, not the 0 the 4-step run ended on.
    assert rates[4] == pytest.approx(5e-4)


def test_eval_dataset_is_evaluated_every_eval_steps(tiny_model_dir, data_file, tmp_path):
    held_out = write_jsonl(tmp_path / "eval.jsonl", chat_rows(3))
    output = tmp_path / "run"
    assert sft(tiny_model_dir, data_file, output, "--max-steps", "4", "--eval-dataset", held_out, "--eval-steps", "2",
               "--precision", "fp32") == 0
    evaluations = [line for line in read_metrics(output) if "eval_loss" in line]
    assert [line["step"] for line in evaluations] == [2, 4]
    assert all(0 < line["eval_loss"] < 20 for line in evaluations)


def test_max_grad_norm_clips_the_update(tiny_model_dir, data_file, tmp_path):
    """One plain SGD step moves the weights by exactly lr * gradient: clipped to the norm asked for."""
    from safetensors.torch import load_file

    initial = load_file(tiny_model_dir / "model.safetensors")
    moved = {}
    for clip in ("0", "0.001"):
        output = tmp_path / f"clip-{clip}"
        assert sft(tiny_model_dir, data_file, output, "--adapter", "full", "--optimizer", "sgd", "--learning-rate", "1",
                   "--max-grad-norm", clip, "--max-steps", "1", "--batch-size", "8", "--precision", "fp32") == 0
        final = load_file(output / "final" / "model.safetensors")
        delta = torch.sqrt(sum(((final[key] - initial[key]).double() ** 2).sum() for key in final))
        moved[clip] = (float(delta), read_metrics(output)[0]["grad_norm"])
    unclipped_delta, grad_norm = moved["0"]
    assert unclipped_delta == pytest.approx(grad_norm, rel=1e-3)
    clipped_delta, same_grad_norm = moved["0.001"]
    assert same_grad_norm == pytest.approx(grad_norm) and grad_norm > 0.01  # the log shows the norm before clipping
    assert clipped_delta == pytest.approx(0.001, rel=1e-3)


def test_weight_decay_skips_norms_biases_and_embeddings(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from tunesmith.optimization import parameter_groups

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed, undecayed = parameter_groups(model, weight_decay=0.1)
    assert decayed["weight_decay"] == 0.1 and undecayed["weight_decay"] == 0.0
    decayed_names = {names[id(p)] for p in decayed["params"]}
    undecayed_names = {names[id(p)] for p in undecayed["params"]}
    assert all(name.endswith("proj.weight") for name in decayed_names)
    assert "model.embed_tokens.weight" in undecayed_names
    assert all("norm" in name or "embed" in name for name in undecayed_names)


def test_dora_and_target_modules_reach_the_adapter(tiny_model_dir, data_file, tmp_path):
    import json

    output = tmp_path / "run"
    assert sft(tiny_model_dir, data_file, output, "--adapter", "dora", "--target-modules", "q_proj,v_proj",
               "--lora-rank", "4", "--max-steps", "1", "--precision", "fp32") == 0
    adapter_config = json.loads((output / "final" / "adapter_config.json").read_text())
    assert adapter_config["use_dora"] is True and adapter_config["r"] == 4
    assert set(adapter_config["target_modules"]) == {"q_proj", "v_proj"}
    weights = adapter_weights(output / "final")
    assert any("lora_magnitude_vector" in key for key in weights)
    assert not any("k_proj" in key or "mlp" in key for key in weights)


def test_the_last_epoch_ends_with_the_data(tiny_model_dir, data_file, tmp_path):
    output = tmp_path / "run"
    # 8 rows in micro-batches of 3 give 3 micro-batches; two per step leaves one for the second step.
    assert sft(tiny_model_dir, data_file, output, "--batch-size", "3", "--grad-accum", "2", "--epochs", "1", "--precision", "fp32") == 0
    lines = read_metrics(output)
    assert [line["step"] for line in lines] == [1, 2]
    assert lines[-1]["epoch"] == pytest.approx(1.0)
    first_step_tokens = lines[0]["num_tokens"]
    assert lines[1]["num_tokens"] - first_step_tokens < first_step_tokens  # the second step saw fewer rows


def test_a_resumed_run_trains_with_its_own_learning_rate_and_weight_decay(tiny_model_dir, data_file, tmp_path):
    output = tmp_path / "run"
    common = ("--precision", "fp32", "--lr-scheduler", "constant", "--save-steps", "2")
    assert run_cli("sft", "--model", tiny_model_dir, "--dataset", data_file, "--output-dir", output, "--batch-size", "2",
                   "--max-steps", "2", "--learning-rate", "1e-4", *common) == 0
    assert run_cli("sft", "--model", tiny_model_dir, "--dataset", data_file, "--output-dir", output, "--batch-size", "2",
                   "--max-steps", "4", "--learning-rate", "1e-3", "--weight-decay", "0.5", *common) == 0
    assert [line["learning_rate"] for line in read_metrics(output)] == pytest.approx([1e-4, 1e-4, 1e-3, 1e-3])
    optimizer_state = torch.load(output / "checkpoint-4" / "optimizer.pt", weights_only=True)
    assert optimizer_state["param_groups"][0]["weight_decay"] == 0.5


def test_re_running_a_finished_run_says_so_and_shows_no_nan(tiny_model_dir, data_file, tmp_path, capsys):
    output = tmp_path / "run"
    assert sft(tiny_model_dir, data_file, output, "--max-steps", "2", "--save-steps", "2", "--precision", "fp32") == 0
    capsys.readouterr()
    assert sft(tiny_model_dir, data_file, output, "--max-steps", "2", "--save-steps", "2", "--precision", "fp32") == 0
    shown = capsys.readouterr().out
    assert "nothing left to train: 2 of 2 steps were done already" in shown
    assert "nan" not in shown.replace(str(tmp_path), "") and "sft step" not in shown  # no step line for steps not run


def test_the_terminal_bar_shows_a_dash_until_a_loss_is_logged():
    import io

    from rich.console import Console

    from tunesmith.progress import StepProgress

    screen = io.StringIO()
    with StepProgress(Console(file=screen, force_terminal=True, width=120), "sft", total=2, completed=2, learning_rate=1e-4):
        pass
    assert "loss -" in screen.getvalue() and "nan" not in screen.getvalue()


def test_compile_compiles_the_trained_model_in_place(tiny_model_dir, data_file, tmp_path, monkeypatch):
    # Compiling for real takes minutes on a CPU; what --compile must do is hand the model to torch.compile in place.
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda module, *args, **kwargs: compiled.append(module))
    assert sft(tiny_model_dir, data_file, tmp_path / "run", "--max-steps", "1", "--compile") == 0
    assert len(compiled) == 1 and any(p.requires_grad for p in compiled[0].parameters())
    assert sft(tiny_model_dir, data_file, tmp_path / "plain", "--max-steps", "1") == 0
    assert len(compiled) == 1
