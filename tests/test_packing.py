"""Packing is exact: a packed sample is trained exactly as if it were alone in its batch.

The reference is an independent forward pass of each sample on its own; nothing here compares
against numbers written down by hand except the collator's layout on a toy row.
"""

from __future__ import annotations

import random

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, MistralConfig, Qwen2Config

from tunesmith.data.collate import collate_causal
from tunesmith.data.packing import pack, unpacked
from tunesmith.data.tokenize import tokenize_chat, tokenize_text
from tunesmith.data.types import IGNORE_INDEX, Sample
from tunesmith.engine import enable_activation_checkpointing
from tunesmith.generation import GenerationOptions, generate_batch
from tunesmith.losses import per_token_losses
from tunesmith.models import load_model as tunesmith_load_model
from tunesmith.packed_attention import PACKED_SDPA, use_packed_sdpa
from tunesmith_trainers.sft import SFTTrainer

CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"}],
    [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "Rome."},
    ],
    [{"role": "user", "content": "Count to five."}, {"role": "assistant", "content": "One, two, three, four, five."}],
    [{"role": "user", "content": "Say yes."}, {"role": "assistant", "content": "Yes."}],
    [
        {"role": "user", "content": "Write a haiku about the sea."},
        {"role": "assistant", "content": "Waves fold into foam,\nsalt wind carries gull voices,\nthe tide keeps its time."},
    ],
]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def samples(tokenizer) -> list[Sample]:
    chats = [tokenize_chat(tokenizer, conversation) for conversation in CONVERSATIONS]
    return chats + [tokenize_text(tokenizer, "Plain text is trained on every token, end of sequence included.")]


def load_model(path, attn_implementation: str, lora: bool = False):
    """The tiny model with transformers' ``sdpa`` or ``eager``, or tunesmith's ``packed_sdpa``."""
    packed = attn_implementation == PACKED_SDPA
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa" if packed else attn_implementation)
    assert use_packed_sdpa(model) if packed else model.config._attn_implementation == attn_implementation
    if lora:
        # Random, non-zero adapters, so the adapted model differs from the base one.
        config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        model = get_peft_model(model, config)
    return model.eval()


def sample_slices(rows: list[list[Sample]]):
    """``(row, start, sample)`` for every sample of a batch built from ``rows``."""
    for b, row in enumerate(rows):
        start = 0
        for sample in row:
            yield b, start, sample
            start += len(sample)


@pytest.mark.parametrize(
    ("attn_implementation", "lora"), [("sdpa", False), ("eager", False), ("sdpa", True), (PACKED_SDPA, False), (PACKED_SDPA, True)]
)
def test_packed_per_token_losses_equal_each_sample_alone(tiny_model_dir, tokenizer, samples, attn_implementation, lora):
    model = load_model(tiny_model_dir, attn_implementation, lora)
    longest = max(len(sample) for sample in samples)
    rows = pack(samples, max_length=longest + 40)
    # The check means something only if rows really hold several samples and some padding.
    assert any(len(row) > 1 for row in rows)
    assert len({sum(len(sample) for sample in row) for row in rows}) > 1

    with torch.no_grad():
        packed = per_token_losses(model, collate_causal(rows, tokenizer.pad_token_id))
        for b, start, sample in sample_slices(rows):
            alone = per_token_losses(model, collate_causal([[sample]], tokenizer.pad_token_id))[0]
            torch.testing.assert_close(packed[b, start : start + len(sample)], alone, rtol=0, atol=1e-5)


def test_packing_without_position_restarts_would_leak(tiny_model_dir, tokenizer, samples):
    """The comparison above can fail: one continuous position run lets samples see each other."""
    model = load_model(tiny_model_dir, "sdpa")
    rows = pack(samples, max_length=max(len(sample) for sample in samples) + 40)
    batch = collate_causal(rows, tokenizer.pad_token_id)
    batch["position_ids"] = torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"])
    with torch.no_grad():
        leaky = per_token_losses(model, batch)
        b, start, sample = next((b, start, sample) for b, start, sample in sample_slices(rows) if start > 0)
        alone = per_token_losses(model, collate_causal([[sample]], tokenizer.pad_token_id))[0]
    assert (leaky[b, start : start + len(sample)] - alone).abs().max() > 1e-3


@pytest.mark.parametrize(("attn_implementation", "checkpointing"), [("sdpa", False), (PACKED_SDPA, False), (PACKED_SDPA, True)])
def test_one_step_has_the_same_mean_loss_and_gradients_with_and_without_packing(tiny_model_dir, tokenizer, samples, attn_implementation,
                                                                              checkpointing):
    model = load_model(tiny_model_dir, attn_implementation).train()
    if checkpointing:  # backward runs each layer's attention again, on the same packed rows
        enable_activation_checkpointing(model)
    trainer = SFTTrainer(tokenizer)

    def step(rows):
        model.zero_grad()
        batch = trainer.collate(rows)
        mean_loss = trainer.compute_loss(model, batch).loss / trainer.count_items(batch)
        mean_loss.backward()
        return mean_loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}

    packed_loss, packed_grads = step(pack(samples, max_length=256))
    plain_loss, plain_grads = step(unpacked(samples))
    torch.testing.assert_close(packed_loss, plain_loss, rtol=0, atol=1e-5)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_pack_fills_rows_within_max_length_and_keeps_every_sample():
    rng = random.Random(0)
    samples = [Sample(input_ids=[7] * length, labels=[7] * length) for length in (rng.randint(1, 100) for _ in range(300))]
    rows = pack(samples, max_length=128)
    assert all(sum(len(sample) for sample in row) <= 128 for row in rows)
    assert sorted(id(sample) for row in rows for sample in row) == sorted(id(sample) for sample in samples)
    # Best-fit decreasing packs within a few rows of the lower bound.
    assert len(rows) <= -(-sum(len(sample) for sample in samples) // 128) + 3
    layout = [[id(sample) for sample in row] for row in rows]
    assert [[id(sample) for sample in row] for row in pack(samples, max_length=128)] == layout


def test_pack_refuses_a_sample_longer_than_a_row():
    with pytest.raises(ValueError, match="5 tokens"):
        pack([Sample([1] * 5, [1] * 5)], max_length=4)


def test_unpacked_is_one_sample_per_row():
    samples = [Sample([1, 2], [1, 2]), Sample([3], [3])]
    assert unpacked(samples) == [[samples[0]], [samples[1]]]


def test_collate_restarts_positions_and_never_targets_across_samples():
    first = Sample(input_ids=[11, 12, 13], labels=[IGNORE_INDEX, 12, 13])
    second = Sample(input_ids=[21, 22], labels=[21, 22])
    alone = Sample(input_ids=[31], labels=[31])
    batch = collate_causal([[first, second], [alone]], pad_token_id=0)
    ignore = IGNORE_INDEX
    assert batch["input_ids"].tolist() == [[11, 12, 13, 21, 22], [31, 0, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 4]]  # padding continues the last sample
    assert batch["targets"].tolist() == [[12, 13, ignore, 22, ignore], [ignore] * 5]
    assert batch["input_ids"].dtype == batch["position_ids"].dtype == batch["targets"].dtype == torch.long
    assert batch["num_target_tokens"] == 3
    assert batch["num_input_tokens"] == 6


def test_unpacked_padded_rows_take_the_mask_free_causal_path_and_lose_nothing(tiny_model_dir, tokenizer, samples, monkeypatch):
    model = load_model(tiny_model_dir, "sdpa")
    rows = unpacked(samples)
    assert len({len(sample) for sample in samples}) > 1  # rows of different lengths: there is padding
    calls = []
    real_attention = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append((kwargs.get("attn_mask"), kwargs.get("is_causal")))
        return real_attention(*args, **kwargs)

    with torch.no_grad():
        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
        padded = per_token_losses(model, collate_causal(rows, tokenizer.pad_token_id))
        monkeypatch.undo()
        assert calls and all(mask is None and causal for mask, causal in calls)
        for b, start, sample in sample_slices(rows):
            alone = per_token_losses(model, collate_causal([[sample]], tokenizer.pad_token_id))[0]
            torch.testing.assert_close(padded[b, : len(sample)], alone, rtol=0, atol=1e-5)


def test_packed_sdpa_attends_within_each_sample_without_a_mask(tiny_model_dir, tokenizer, samples, monkeypatch):
    model = load_model(tiny_model_dir, PACKED_SDPA)
    rows = pack(samples, max_length=max(len(sample) for sample in samples) + 40)
    batch = collate_causal(rows, tokenizer.pad_token_id)
    length = batch["input_ids"].shape[1]
    # each sample, the last of a row running on over the row's padding (never attended to: it comes after)
    expected = [len(row[-1]) + length - sum(map(len, row)) if sample is row[-1] else len(sample) for row in rows for sample in row]
    calls = []
    real_attention = torch.nn.functional.scaled_dot_product_attention

    def spy(query, key, value, **kwargs):
        calls.append((query.shape[0], key.shape[2], kwargs.get("attn_mask"), kwargs.get("is_causal")))
        return real_attention(query, key, value, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        per_token_losses(model, batch)
    layers = model.config.num_hidden_layers
    assert [(rows_, keys) for rows_, keys, _, _ in calls] == [(1, n) for _ in range(layers) for n in expected]
    assert all(mask is None and causal for _, _, mask, causal in calls)


def test_packed_sdpa_generates_padded_batches_as_sdpa_does(tiny_model_dir, tokenizer):
    prompts = [tokenizer("Hi there")["input_ids"], tokenizer("Count to five, then say the capital of France")["input_ids"]]
    options = GenerationOptions(max_new_tokens=6, temperature=0.0)
    sdpa, packed = (load_model(tiny_model_dir, name) for name in ("sdpa", PACKED_SDPA))
    assert [c.token_ids for c in generate_batch(packed, tokenizer, prompts, options)] == [
        c.token_ids for c in generate_batch(sdpa, tokenizer, prompts, options)
    ]


def test_models_whose_attention_is_plain_causal_get_packed_sdpa_and_save_as_sdpa(tiny_model_dir, tmp_path):
    model = tunesmith_load_model(tiny_model_dir)
    assert model.config._attn_implementation == PACKED_SDPA
    model.save_pretrained(tmp_path / "saved")
    assert PACKED_SDPA not in (tmp_path / "saved" / "config.json").read_text()
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "saved").config._attn_implementation in ("sdpa", "eager")
    assert tunesmith_load_model(tiny_model_dir, attn_implementation="eager").config._attn_implementation == "eager"


@pytest.mark.parametrize("layer_types", [["full_attention", "sliding_attention"], None])
def test_sliding_window_models_keep_sdpa(tmp_path, layer_types):
    config = Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, sliding_window=8, use_sliding_window=True, layer_types=layer_types)
    if layer_types is None:  # sliding everywhere, as a Mistral config without layer types says it
        config = MistralConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                               num_key_value_heads=1, sliding_window=8)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    assert tunesmith_load_model(tmp_path).config._attn_implementation == "sdpa"
