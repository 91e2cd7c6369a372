"""Generation, ``tunesmith infer`` and ``tunesmith export`` on the tiny model.

The export is checked against peft itself: the merged folder, loaded with plain transformers,
must generate exactly what the base model with the adapter applied by peft generates.
"""

from __future__ import annotations

import io
import shutil
import threading

import pytest
import torch
import yaml
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.helpers import run_cli
from tunesmith.generation import GenerationOptions, generate_ids, generate_reply, stream_reply
from tunesmith.models import load_for_inference
from tunesmith.plugins import create_plugin_manager
from tunesmith.runtime import select_runtime

PROMPTS = ["Hello!", "What is the capital of France?", "Write a haiku about rain."]


def make_run(tiny_model_dir, folder, use_dora: bool):
    """A training run folder as tunesmith writes it: config.yaml naming the base, and final/."""
    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    # Random (not zero) LoRA B so the adapter really changes what the model generates.
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=use_dora, init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(folder / "final")
    (folder / "config.yaml").write_text(yaml.safe_dump({"model": str(tiny_model_dir), "adapter": "lora"}))
    return folder / "final"


@pytest.fixture(scope="module")
def lora_adapter(tiny_model_dir, tmp_path_factory):
    return make_run(tiny_model_dir, tmp_path_factory.mktemp("lora-run"), use_dora=False)


@pytest.fixture(scope="module")
def dora_adapter(tiny_model_dir, tmp_path_factory):
    return make_run(tiny_model_dir, tmp_path_factory.mktemp("dora-run"), use_dora=True)


def plain_greedy_ids(model, tokenizer, prompt: str, max_new_tokens: int = 12) -> list[int]:
    """Greedy generation through transformers alone, independent of tunesmith.generation."""
    input_ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=False
    )
    output = model.generate(
        input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False, max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
    )
    return output[0, input_ids.shape[1] :].tolist()


@pytest.mark.parametrize("adapter_fixture", ["lora_adapter", "dora_adapter"])
def test_merged_export_generates_like_base_plus_adapter(request, adapter_fixture, tiny_model_dir, tmp_path, capsys):
    adapter = request.getfixturevalue(adapter_fixture)
    output = tmp_path / "merged"
    assert run_cli("export", "--model", tiny_model_dir, "--adapter", adapter, "--output", output) == 0
    assert f"merged model written to {output}" in capsys.readouterr().out
    assert (output / "model.safetensors").is_file()
    assert not list(output.glob("*.bin")) and not list(output.glob("adapter_*"))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "staging folder left behind"

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    merged_tokenizer = AutoTokenizer.from_pretrained(output)
    assert merged_tokenizer.chat_template == tokenizer.chat_template

    merged = AutoModelForCausalLM.from_pretrained(output).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter).eval()
    merged_ids = [plain_greedy_ids(merged, merged_tokenizer, prompt) for prompt in PROMPTS]
    assert merged_ids == [plain_greedy_ids(adapted, tokenizer, prompt) for prompt in PROMPTS]
    assert merged_ids != [plain_greedy_ids(base, tokenizer, prompt) for prompt in PROMPTS], "the adapter changed nothing"


def test_export_takes_the_base_model_from_the_run_config(lora_adapter, tiny_model_dir, tmp_path, capsys):
    output = tmp_path / "merged"
    assert run_cli("export", "--adapter", lora_adapter, "--output", output) == 0
    assert f"base model: {tiny_model_dir}" in capsys.readouterr().err
    assert (output / "config.json").is_file()


def test_export_refuses_to_overwrite_unless_forced(lora_adapter, tiny_model_dir, tmp_path, capsys):
    output = tmp_path / "merged"
    output.mkdir()
    (output / "keep.txt").write_text("precious")
    assert run_cli("export", "--adapter", lora_adapter, "--output", output) != 0
    assert "--output" in capsys.readouterr().err and (output / "keep.txt").is_file()

    assert run_cli("export", "--adapter", lora_adapter, "--output", output, "--force") == 0
    assert not (output / "keep.txt").exists() and (output / "model.safetensors").is_file()


def test_infer_prompt_prints_the_reply(lora_adapter, tiny_model_dir, capsys):
    # No --model: the base comes from the run's config.yaml.
    assert run_cli("infer", "--adapter", lora_adapter, "--prompt", "Hello!", "--system", "Be brief.", "--max-new-tokens", "10") == 0
    captured = capsys.readouterr()
    assert f"base model: {tiny_model_dir}" in captured.err

    # The expectation is built without tunesmith's loader: plain transformers plus peft.
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]
    options = GenerationOptions(max_new_tokens=10)
    base_reply = generate_reply(base, tokenizer, messages, options)
    adapted = PeftModel.from_pretrained(base, lora_adapter).eval()
    expected = generate_reply(adapted, tokenizer, messages, options)
    assert expected != base_reply, "the adapter must change the reply for this test to mean anything"
    assert captured.out == expected + "\n"


def test_infer_accepts_a_full_model_folder(tiny_model_dir, capsys):
    assert run_cli("infer", "--model", tiny_model_dir, "--prompt", "Hello!", "--max-new-tokens", "5") == 0
    model, tokenizer = load_for_inference(str(tiny_model_dir), cpu_runtime())
    expected = generate_reply(model, tokenizer, [{"role": "user", "content": "Hello!"}], GenerationOptions(max_new_tokens=5))
    assert capsys.readouterr().out == expected + "\n"


def test_interactive_chat_keeps_history_and_clears(tiny_model_dir, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello!\nAnd then?\n/clear\nHello!\n"))
    assert run_cli("infer", "--model", tiny_model_dir, "--max-new-tokens", "6") == 0
    out = capsys.readouterr().out

    model, tokenizer = load_for_inference(str(tiny_model_dir), cpu_runtime())
    options = GenerationOptions(max_new_tokens=6)
    first = generate_reply(model, tokenizer, [{"role": "user", "content": "Hello!"}], options)
    history = [
        {"role": "user", "content": "Hello!"},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "And then?"},
    ]
    second = generate_reply(model, tokenizer, history, options)
    # Prompts ">>> " for: turn 1, turn 2, /clear, turn 3 (same as turn 1 again), then EOF.
    assert out == f">>> {first}\n>>> {second}\n>>> >>> {first}\n>>> "


def test_exit_command_stops_the_chat(tiny_model_dir, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("/exit\nHello!\n"))
    assert run_cli("infer", "--model", tiny_model_dir) == 0
    assert capsys.readouterr().out == ">>> "


def test_seeded_sampling_is_reproducible_and_streams_the_same_text(tiny_model_dir):
    model, tokenizer = load_for_inference(str(tiny_model_dir), cpu_runtime())
    messages = [{"role": "user", "content": "Tell me a story."}]
    seeded = GenerationOptions(max_new_tokens=16, temperature=1.0, top_p=0.9, top_k=100, seed=7)
    first = generate_ids(model, tokenizer, messages, seeded)
    assert generate_ids(model, tokenizer, messages, seeded) == first
    other_seed = GenerationOptions(max_new_tokens=16, temperature=1.0, top_p=0.9, top_k=100, seed=8)
    assert generate_ids(model, tokenizer, messages, other_seed) != first
    assert "".join(stream_reply(model, tokenizer, messages, seeded)) == tokenizer.decode(first, skip_special_tokens=True)


def test_closing_a_stream_early_stops_its_thread(tiny_model_dir):
    model, tokenizer = load_for_inference(str(tiny_model_dir), cpu_runtime())
    stream = stream_reply(model, tokenizer, [{"role": "user", "content": "Hi"}], GenerationOptions(max_new_tokens=500))
    next(stream)
    stream.close()
    assert not [t for t in threading.enumerate() if t.name == "tunesmith-generate"]


def test_an_adapter_folder_copied_without_its_run_finds_its_base_in_adapter_config(lora_adapter, tiny_model_dir, tmp_path, capsys):
    copied = shutil.copytree(lora_adapter, tmp_path / "just-the-adapter")
    assert not (copied.parent / "config.yaml").exists()
    assert run_cli("infer", "--adapter", copied, "--prompt", "Hi", "--max-new-tokens", "2") == 0
    assert f"base model: {tiny_model_dir}" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["infer", "export"])
def test_adapter_folder_without_adapter_config_is_rejected(command, tiny_model_dir, tmp_path, capsys):
    args = ["--output", tmp_path / "out"] if command == "export" else ["--prompt", "Hi"]
    assert run_cli(command, "--model", tiny_model_dir, "--adapter", tmp_path, *args) != 0
    assert f"--adapter {tmp_path}: no adapter_config.json" in capsys.readouterr().err

    # A full model folder passed as an adapter: infer takes it as --model; export has nothing to do.
    assert run_cli(command, "--adapter", tiny_model_dir, *args) != 0
    err = capsys.readouterr().err
    assert f"--adapter {tiny_model_dir}: no adapter_config.json there, so it is not a peft adapter folder (it holds a full model: " in err
    if command == "infer":
        assert "pass it as --model instead" in err
    else:
        assert "there is nothing to merge; use or copy that folder as it is, e.g. tunesmith infer --model" in err
        assert "pass it as --model" not in err
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["infer", "export"])
def test_missing_model_folder_is_rejected(command, lora_adapter, tmp_path, capsys):
    args = ["--adapter", lora_adapter, "--output", tmp_path / "out"] if command == "export" else ["--prompt", "Hi"]
    missing = tmp_path / "no-such-model"
    assert run_cli(command, "--model", missing, *args) != 0
    assert f"--model {missing}: not a local model folder" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_bad_generation_options_name_the_option(tiny_model_dir, capsys):
    assert run_cli("infer", "--model", tiny_model_dir, "--prompt", "Hi", "--temperature", "-1") != 0
    assert "--temperature" in capsys.readouterr().err


@pytest.mark.slow
def test_default_model_answers_and_stops_at_end_of_turn(default_model_dir):
    model, tokenizer = load_for_inference("smollm2-135m", cpu_runtime())
    options = GenerationOptions(max_new_tokens=64)
    reply_ids = generate_ids(model, tokenizer, [{"role": "user", "content": "What is the capital of France?"}], options)
    assert reply_ids[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert "Paris" in tokenizer.decode(reply_ids, skip_special_tokens=True)


def cpu_runtime():
    return select_runtime(create_plugin_manager(), "cpu", "fp32")
