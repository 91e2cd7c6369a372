"""Option names from TrainingArguments, TRL, peft, LLaMA-Factory and ms-swift: each alias reaches
its option in YAML (and, where it only renames, on the command line), and files written for
those tools train, with the keys that mean nothing here named as ignored."""

from __future__ import annotations

import pytest
import yaml

from tests.helpers import run_cli, write_jsonl
from tunesmith.aliases import ALIASES_BY_NAME, IGNORED_KEYS, OPTION_ALIASES
from tunesmith.commands.train import make_train_command
from tunesmith.config import FIELDS, resolve_config

#: each alias with a value a user would write, and the option value it must become
YAML_CASES = {
    "model_name_or_path": ("some/model", ("model", "some/model")),
    "per_device_train_batch_size": (3, ("batch_size", 3)),
    "gradient_accumulation_steps": (5, ("grad_accum", 5)),
    "num_train_epochs": (3.0, ("epochs", 3)),
    "resume_from_checkpoint": ("never", ("resume", "never")),
    "lr_scheduler_type": ("linear", ("lr_scheduler", "linear")),
    "optim": ("adamw_torch", ("optimizer", "adamw")),
    "max_seq_length": (256, ("max_length", 256)),
    "cutoff_len": (128, ("max_length", 128)),
    "val_size": (0.1, ("val_split", 0.1)),
    "lora_r": (16, ("lora_rank", 16)),
    "lora_target": ("all", ("target_modules", "all-linear")),
    "bf16": (True, ("precision", "bf16")),
    "fp16": (True, ("precision", "fp16")),
    "torch_dtype": ("bfloat16", ("precision", "bf16")),
    "use_dora": (True, ("adapter", "dora")),
    "finetuning_type": ("full", ("adapter", "full")),
    "train_type": ("lora", ("adapter", "lora")),
}


def resolved(tmp_path, content: dict, *flags: str):
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump({"dataset": ["data.jsonl"], **content}))
    command = make_train_command("sft")
    context = command.make_context("sft", ["--config", str(config_file), *flags])
    values = dict(context.params)
    return resolve_config(context, values, values.pop("config_file"))


def test_the_table_names_real_options_and_no_option_of_ours():
    assert set(YAML_CASES) == set(ALIASES_BY_NAME), "every alias needs a case below"
    for alias in OPTION_ALIASES:
        assert alias.option in FIELDS and alias.name not in FIELDS, alias
    assert not set(IGNORED_KEYS) & (set(FIELDS) | set(ALIASES_BY_NAME))


@pytest.mark.parametrize("name", list(YAML_CASES))
def test_each_alias_sets_its_option_in_yaml(tmp_path, name):
    value, (option, expected) = YAML_CASES[name]
    assert getattr(resolved(tmp_path, {name: value}), option) == expected


@pytest.mark.parametrize("alias", [alias for alias in OPTION_ALIASES if alias.renames], ids=lambda alias: alias.name)
def test_each_renaming_alias_is_a_flag_too(tmp_path, alias):
    value, (option, expected) = YAML_CASES[alias.name]
    flag = "--" + alias.name.replace("_", "-")
    assert getattr(resolved(tmp_path, {}, flag, str(value)), option) == expected


def test_help_lists_an_alias_beside_its_option(capsys):
    assert run_cli("sft", "--help") == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "--batch-size, --per-device-train-batch-size" in out
    assert "--grad-accum, --gradient-accumulation-steps" in out


def test_a_trl_style_file_trains_and_names_what_it_ignored(tiny_model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", [
        {"messages": [{"role": "user", "content": f"Say {i}."}, {"role": "assistant", "content": f"{i}."}]} for i in range(4)
    ])
    config = tmp_path / "trl.yaml"
    config.write_text(yaml.safe_dump({
        "model_name_or_path": str(tiny_model_dir), "dataset": [str(data)], "output_dir": str(tmp_path / "run"),
        "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1, "num_train_epochs": 1.0, "learning_rate": 1e-3,
        "max_seq_length": 64, "lr_scheduler_type": "constant", "logging_steps": 1, "save_steps": 0, "report_to": "none",
        "dataloader_num_workers": 2, "torch_dtype": "float32",
    }))
    assert run_cli("sft", "--config", config) == 0
    assert (tmp_path / "run" / "final").is_dir()
    written = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert (written["batch_size"], written["epochs"], written["max_length"], written["precision"]) == (2, 1, 64, "fp32")
    err = capsys.readouterr().err
    assert "ignored keys:" in err and "dataloader_num_workers (" in err
    assert "report_to" not in err and written["report_to"] == ["none"]  # TRL's spelling of no tracker


def test_a_llama_factory_file_skips_its_own_keys_and_a_tunesmith_file_refuses_them(tmp_path, capsys):
    config = resolved(tmp_path, {"stage": "sft", "do_train": True, "finetuning_type": "lora", "lora_target": "all",
                                 "cutoff_len": 512, "template": "llama3", "flash_attn": "auto"})
    assert (config.adapter, config.target_modules, config.max_length) == ("lora", "all-linear", 512)
    err = capsys.readouterr().err
    assert "stage (" in err and "template (" in err and "flash_attn (no such option here" in err
    with pytest.raises(Exception, match="unknown key 'flash_attn'"):
        resolved(tmp_path, {"flash_attn": "auto", "learning_rate": 0.1})
