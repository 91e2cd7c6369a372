"""The vLLM generation backend against tunesmith's own generation on the same policy.

One engine serves the whole module (starting one takes seconds); each test moves the policy's
weights as an optimizer update would and hands them over with ``sync_weights``.
"""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tunesmith import GenerationOptions, create_generation_backend, create_plugin_manager, generate_batch
from tunesmith.plugins import build_device

PROMPTS = [[1, 20, 300], [1, 4000, 17, 9], [1, 812]]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def policy(tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0))


@pytest.fixture(scope="module")
def backend(policy, tokenizer, monkeypatch_module):
    monkeypatch_module.setenv("TUNESMITH_PLUGINS", "tunesmith-vllm")
    manager = create_plugin_manager()
    return create_generation_backend(manager, "vllm", policy, tokenizer, build_device(manager.get("device", "cpu")))


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def update(policy, seed):
    """What an optimizer step does to a LoRA policy: its adapters move."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in policy.named_parameters():
            if "lora_" in name:
                parameter.add_(torch.randn(parameter.shape, generator=generator), alpha=0.2)


def test_greedy_rollouts_equal_the_policy_s_own_after_each_update(backend, policy, tokenizer):
    greedy = GenerationOptions(max_new_tokens=8)
    seen = []
    for seed in range(3):
        completions = backend.generate(PROMPTS, greedy, num_return_sequences=2)
        expected = generate_batch(policy, tokenizer, PROMPTS, greedy, num_return_sequences=2)
        assert [(c.prompt_index, c.token_ids, c.text, c.finish_reason) for c in completions] == [
            (c.prompt_index, c.token_ids, c.text, c.finish_reason) for c in expected
        ]
        seen.append([c.token_ids for c in completions])
        update(policy, seed)
        backend.sync_weights(policy)
    assert seen[0] != seen[1] != seen[2]  # the updates changed what the engine generates


def test_stop_strings_end_completions_as_the_policy_s_own_do(backend, policy, tokenizer):
    greedy = GenerationOptions(max_new_tokens=12)
    whole = generate_batch(policy, tokenizer, PROMPTS, greedy)
    stops = [whole[0].text[4:7], whole[2].text[5:8]]
    completions = backend.generate(PROMPTS, greedy, stop_strings=stops)
    expected = generate_batch(policy, tokenizer, PROMPTS, greedy, stop_strings=stops)
    assert [(c.token_ids, c.text, c.finish_reason) for c in completions] == [(c.token_ids, c.text, c.finish_reason) for c in expected]
    assert completions[0].finish_reason == "stop" and len(completions[0].text) <= 4


def test_sampling_follows_the_generator_and_leaves_the_global_rngs_as_they_were(backend):
    sampled = GenerationOptions(max_new_tokens=8, temperature=1.0, top_p=0.95, top_k=50)
    global_state, python_state = torch.random.get_rng_state(), random.getstate()

    def draw(seed):
        return [c.token_ids for c in backend.generate(PROMPTS, sampled, num_return_sequences=3, generator=torch.Generator().manual_seed(seed))]

    first, again, other = draw(0), draw(0), draw(1)
    assert first == again and first != other
    assert len({tuple(ids) for ids in first[:3]}) > 1  # a prompt's completions differ from each other
    assert torch.equal(torch.random.get_rng_state(), global_state) and random.getstate() == python_state
