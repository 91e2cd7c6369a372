"""The shared training loop end to end on a tiny model: learning, accumulation, packing,
metrics, evaluation, non-finite steps, checkpoints and config handling."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from tests.helpers import adapter_weights, chat_rows, qa_rows, read_metrics, run_cli, write_jsonl


@pytest.fixture
def data_file(tmp_path):
    return write_jsonl(tmp_path / "train.jsonl", chat_rows(8))


def base_args(tiny_model_dir, data_file, output_dir, *extra):
    return [
        "sft", "--model", tiny_model_dir, "--dataset", data_file, "--output-dir", output_dir,
        "--precision", "fp32", "--save-steps", "0", *extra,
    ]


def test_tiny_model_overfits_and_infer_returns_the_trained_answer(tiny_model_dir, tmp_path, capsys):
    output = tmp_path / "run"
    data = write_jsonl(tmp_path / "qa.jsonl", qa_rows())
    code = run_cli(*base_args(tiny_model_dir, data, output, "--adapter", "full", "--learning-rate", "5e-3",
                              "--max-steps", "40", "--batch-size", "8", "--lr-scheduler", "constant"))
    assert code == 0
    losses = [m["loss"] for m in read_metrics(output) if "loss" in m]
    assert losses[-1] < 0.1 * losses[0], losses
    capsys.readouterr()
    assert run_cli("infer", "--model", output / "final", "--prompt", "Which planet is red?", "--max-new-tokens", "8") == 0
    assert capsys.readouterr().out.strip() == "Mars."


def test_metrics_lines_carry_the_documented_fields(tiny_model_dir, data_file, tmp_path, capsys):
    output = tmp_path / "run"
    assert run_cli(*base_args(tiny_model_dir, data_file, output, "--max-steps", "3", "--batch-size", "2", "--val-split", "0.25", "--eval-steps", "2")) == 0
    lines = read_metrics(output)
    train_lines = [m for m in lines if "loss" in m]
    assert [m["step"] for m in train_lines] == [1, 2, 3]
    for key in ("step", "epoch", "loss", "learning_rate", "grad_norm", "num_tokens", "tokens_per_second", "device"):
        assert key in train_lines[0]
    assert train_lines[0]["device"] == "cpu"
    assert train_lines[0]["num_tokens"] < train_lines[1]["num_tokens"] < train_lines[2]["num_tokens"]
    eval_lines = [m for m in lines if "eval_loss" in m]
    assert [m["step"] for m in eval_lines] == [2, 3] and all(math.isfinite(m["eval_loss"]) for m in eval_lines)
    out = capsys.readouterr().out
    assert "device: cpu" in out


def test_gradient_accumulation_matches_one_big_batch(tiny_model_dir, data_file, tmp_path):
    one = tmp_path / "one"
    two = tmp_path / "two"
    common = ("--adapter", "full", "--max-steps", "2", "--lora-dropout", "0", "--learning-rate", "1e-3")
    assert run_cli(*base_args(tiny_model_dir, data_file, one, "--batch-size", "4", "--grad-accum", "1", *common)) == 0
    assert run_cli(*base_args(tiny_model_dir, data_file, two, "--batch-size", "2", "--grad-accum", "2", *common)) == 0
    loss_one = [m["loss"] for m in read_metrics(one)]
    loss_two = [m["loss"] for m in read_metrics(two)]
    assert loss_one == pytest.approx(loss_two, rel=1e-5)
    first, second = adapter_weights(one / "final"), adapter_weights(two / "final")
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=1e-3, atol=1e-5)


def test_one_step_loss_is_the_same_with_and_without_packing(tiny_model_dir, data_file, tmp_path, capsys):
    plain, packed = tmp_path / "plain", tmp_path / "packed"
    common = ("--max-steps", "1", "--batch-size", "8", "--lora-dropout", "0")
    assert run_cli(*base_args(tiny_model_dir, data_file, plain, *common)) == 0
    assert "8 training samples in 8 rows" in capsys.readouterr().out
    assert run_cli(*base_args(tiny_model_dir, data_file, packed, "--packing", "--max-length", "128", *common)) == 0
    assert "8 training samples in 4 rows" in capsys.readouterr().out  # 43 tokens each: two fit a 128-token row
    plain_line, packed_line = read_metrics(plain)[0], read_metrics(packed)[0]
    assert packed_line["loss"] == pytest.approx(plain_line["loss"], rel=1e-5)
    assert packed_line["num_tokens"] == plain_line["num_tokens"]


PACKED_INTO_TOO_FEW_ROWS = "--packing put the 40 training samples into 2 rows of up to --max-length 1024 tokens, fewer than one global batch of 4"


def test_packing_into_fewer_rows_than_a_batch_warns(tiny_model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "short.jsonl", chat_rows(40))
    assert run_cli(*base_args(tiny_model_dir, data, tmp_path / "run", "--packing", "--max-steps", "1")) == 0
    captured = capsys.readouterr()
    assert "40 training samples in 2 rows" in captured.out  # about 43 tokens each: 23 fit a 1024-token row
    assert f"warning: {PACKED_INTO_TOO_FEW_ROWS} (--batch-size 4 x --grad-accum 1), so every step trains on all of them" in captured.err
    assert "use a smaller --max-length, --batch-size or --grad-accum" in captured.err
    # Enough rows for a batch: no warning.
    assert run_cli(*base_args(tiny_model_dir, data, tmp_path / "fits", "--packing", "--max-length", "256", "--max-steps", "1")) == 0
    assert "--packing put" not in capsys.readouterr().err


@pytest.mark.parametrize(("rank", "warned"), [("0", True), ("1", False)])
def test_the_packing_warning_counts_every_process_and_comes_from_the_first(tiny_model_dir, tmp_path, monkeypatch, capsys, rank, warned):
    from transformers import AutoTokenizer

    from tunesmith.config import TrainConfig
    from tunesmith.data.setup import build_training_data
    from tunesmith_trainers.sft import SFTTrainer

    data = write_jsonl(tmp_path / "short.jsonl", chat_rows(40))
    for name, value in {"RANK": rank, "WORLD_SIZE": "2", "LOCAL_RANK": rank}.items():
        monkeypatch.setenv(name, value)
    config = TrainConfig(dataset=(str(data),), packing=True, batch_size=2)
    build_training_data(SFTTrainer(AutoTokenizer.from_pretrained(tiny_model_dir), config), config)
    expected = "fewer than one global batch of 4 (--batch-size 2 x --grad-accum 1 x 2 processes)"
    assert (expected in capsys.readouterr().err) == warned


def test_config_file_flags_override_and_resolved_config_is_written(tiny_model_dir, data_file, tmp_path):
    output = tmp_path / "run"
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"model": str(tiny_model_dir), "dataset": [str(data_file)], "output_dir": str(output),
                                      "max_steps": 1, "learning_rate": 0.5, "precision": "fp32", "save_steps": 0}))
    assert run_cli("sft", "--config", config, "--learning-rate", "2e-4") == 0
    written = yaml.safe_load((output / "config.yaml").read_text())
    assert written["learning_rate"] == 2e-4 and written["max_steps"] == 1 and written["dataset"] == [str(data_file)]


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ({"learning_rat": 0.1}, "unknown key 'learning_rat' (did you mean 'learning_rate'?); valid keys: model,"),
        ({"lora-rnak": 4}, "unknown key 'lora-rnak' (did you mean 'lora_rank'?)"),
        ({"gradient_acumulation_steps": 8}, "unknown key 'gradient_acumulation_steps' (did you mean 'gradient_accumulation_steps', TrainingArguments's name for 'grad_accum'?)"),
        ({"bf16": False}, "key 'bf16' (TrainingArguments's name for 'precision'): expected true"),
        ({"per_device_train_batch_size": 8, "batch_size": 4}, "keys 'batch_size' and 'per_device_train_batch_size' are the same option; keep one"),
        ({"learning-rate": 0.1, "learning_rate": 0.2}, "keys 'learning-rate' and 'learning_rate' are the same option; keep one"),
        ({"lr_scheduler": "cosine_wobble"}, "key 'lr_scheduler'"),
        ({"batch_size": 0}, "key 'batch_size'"),
        ({"packing": "yes please"}, "key 'packing': expected true or false"),
        ({"lora_rank": None}, "key 'lora_rank': expected a value"),
        ({"max_steps": 2.7}, "key 'max_steps': expected a whole number"),
        ({"max_steps": True}, "key 'max_steps': expected a value that is not true/false"),
        ({"target_modules": ["q_proj", "v_proj"]}, "key 'target_modules': expected a single value"),
        ({"eval_dataset": [None]}, "key 'eval_dataset': expected a list of values, got an empty (null) entry"),
        ({"learning_rate": float("nan")}, "key 'learning_rate': expected a number, got nan"),
    ],
)
def test_bad_config_file_names_the_key(tmp_path, capsys, content, expected, data_file):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({"dataset": [str(data_file)], **content}))
    assert run_cli("sft", "--config", config) != 0
    err = capsys.readouterr().err
    assert expected in err and "bad.yaml" in err


def test_config_keys_may_be_spelled_like_the_flags(tmp_path, data_file):
    from tunesmith.commands.train import make_train_command
    from tunesmith.config import resolve_config

    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump({"dataset": [str(data_file)], "learning-rate": 0.5, "grad-accum": 2, "lora_rank": 4}))
    command = make_train_command("sft")
    context = command.make_context("sft", ["--config", str(config_file), "--grad-accum", "3"])
    values = dict(context.params)
    config = resolve_config(context, values, values.pop("config_file"))
    assert (config.learning_rate, config.lora_rank) == (0.5, 4)
    assert config.grad_accum == 3  # a flag still overrides the file, however the key is spelled


def test_bad_flags_name_the_option(capsys, data_file):
    assert run_cli("sft", "--dataset", data_file, "--learning-rat", "0.1") != 0
    assert "--learning-rat" in capsys.readouterr().err
    assert run_cli("sft", "--dataset", data_file, "--lr-scheduler", "wobbly") != 0
    err = capsys.readouterr().err
    assert "--lr-scheduler" in err and "cosine" in err
    assert run_cli("sft", "--dataset", data_file, "--device", "quantum") != 0
    assert "quantum" in capsys.readouterr().err
    assert run_cli("sft", "--dataset", data_file, "--learning-rate", "nan") != 0
    assert "--learning-rate: expected a number, got nan" in capsys.readouterr().err


def test_help_lists_every_option_with_its_default(capsys):
    assert run_cli("sft", "--help") == 0
    out = " ".join(capsys.readouterr().out.split())  # undo click's line wrapping
    for flag in ("--learning-rate", "--lora-rank", "--packing", "--save-total-limit", "--max-bad-steps", "--config"):
        assert flag in out
    assert "default: 0.0001" in out and "default: cosine" in out and "default: no-packing" in out


def test_a_relative_model_path_is_recorded_absolute(tiny_model_dir, data_file, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tiny_model_dir.parent)
    output = tmp_path / "run"
    assert run_cli(*base_args(tiny_model_dir.name, data_file, output, "--max-steps", "1")) == 0
    assert yaml.safe_load((output / "config.yaml").read_text())["model"] == str(tiny_model_dir.resolve())
    adapter_config = json.loads((output / "final" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(tiny_model_dir.resolve())
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert run_cli("infer", "--adapter", output / "final", "--prompt", "Hi", "--max-new-tokens", "2") == 0


def test_eval_dataset_and_val_split_together_are_refused(data_file, capsys):
    assert run_cli("sft", "--dataset", data_file, "--eval-dataset", data_file, "--val-split", "0.2") != 0
    assert "--eval-dataset and --val-split" in capsys.readouterr().err


def test_a_folder_named_like_the_alias_does_not_shadow_it(tmp_path, monkeypatch, data_file):
    from tunesmith.commands.train import make_train_command
    from tunesmith.config import resolve_config

    monkeypatch.chdir(tmp_path)
    (tmp_path / "smollm2-135m").mkdir()  # e.g. an --output-dir named after the model
    command = make_train_command("sft")
    context = command.make_context("sft", ["--dataset", str(data_file)])
    values = dict(context.params)
    config = resolve_config(context, values, values.pop("config_file"))
    assert config.model == "smollm2-135m"
