"""The chunked scoring of target tokens is the plain cross-entropy, without the full logits.

The reference is written here independently: the model's whole ``(B, L, vocab)`` logits and
``F.cross_entropy`` on them. The chunk size is made small so every batch spans several chunks.
In fp64 the two agree to rounding (1e-10): the computation is the same. In fp32 values agree
to 1e-6; gradients to 2e-5 of their norm, since the head's products are summed in another order
and the softmax gradient (probabilities minus one-hot) cancels over the vocabulary.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma2Config, Gemma2ForCausalLM

import tunesmith.losses
from tunesmith import IGNORE_INDEX, causal_lm_loss, collate_causal, sequence_logps, target_logps
from tunesmith.data.tokenize import tokenize_chat, tokenize_text

CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"}],
    [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."},
     {"role": "user", "content": "And of Italy?"}, {"role": "assistant", "content": "Rome."}],
    [{"role": "user", "content": "Count to five."}, {"role": "assistant", "content": "One, two, three, four, five."}],
]
CHUNK_TOKENS = 5


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch, tiny_model_dir):
    vocab = len(AutoTokenizer.from_pretrained(tiny_model_dir))
    monkeypatch.setattr(tunesmith.losses, "CHUNK_ELEMENTS", CHUNK_TOKENS * vocab)


@pytest.fixture(scope="module")
def batches(tiny_model_dir):
    """An SFT batch (prompt tokens masked, right padding) and a packed one with a plain-text sample."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    chats = [tokenize_chat(tokenizer, conversation) for conversation in CONVERSATIONS]
    text = tokenize_text(tokenizer, "Plain text is trained on every token.")
    return {
        "sft": collate_causal([[sample] for sample in chats], tokenizer.pad_token_id),
        "packed": collate_causal([[chats[0], text], [chats[1]], [chats[2]]], tokenizer.pad_token_id),
    }


TOLERANCES = {torch.float32: (1e-6, 2e-5), torch.float64: (1e-10, 1e-10)}  # (loss, gradient)


def load(path, lora: bool, dtype=torch.float32):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    if lora:
        model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    return model


def plain_token_logps(model, batch, temperature: float = 1.0) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    trained = batch["targets"] != IGNORE_INDEX
    logits = logits[trained].to(torch.promote_types(logits.dtype, torch.float32))
    return -F.cross_entropy(logits / temperature, batch["targets"][trained], reduction="none")


def gradients(model, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


def assert_same(chunked_loss, plain_loss, model_chunked, model_plain):
    loss_tolerance, gradient_tolerance = TOLERANCES[chunked_loss.dtype]
    torch.testing.assert_close(chunked_loss, plain_loss, rtol=loss_tolerance, atol=loss_tolerance)
    chunked, plain = gradients(model_chunked, chunked_loss), gradients(model_plain, plain_loss)
    assert chunked.keys() == plain.keys() and chunked
    for name in plain:
        error = (chunked[name] - plain[name]).norm() / plain[name].norm()
        assert error <= gradient_tolerance, f"{name}: relative error {error:.2e}"


@pytest.mark.parametrize(
    ("kind", "lora", "dtype"),
    [("sft", True, torch.float32), ("packed", False, torch.float32), ("packed", True, torch.float64)],
    ids=["sft-lora-fp32", "packed-full-fp32", "packed-lora-fp64"],
)
def test_the_sft_loss_equals_plain_cross_entropy_in_value_and_gradient(tiny_model_dir, batches, kind, lora, dtype):
    batch = batches[kind]
    assert batch["num_target_tokens"] > 3 * CHUNK_TOKENS
    chunked_model, plain_model = load(tiny_model_dir, lora, dtype), load(tiny_model_dir, lora, dtype)
    assert_same(causal_lm_loss(chunked_model, batch), -plain_token_logps(plain_model, batch).sum(), chunked_model, plain_model)


def test_sequence_logps_for_preference_objectives_equal_the_plain_ones(tiny_model_dir, batches):
    batch = batches["packed"]
    chunked_model, plain_model = load(tiny_model_dir, True), load(tiny_model_dir, True)
    logps, counts = sequence_logps(chunked_model, batch, 4)
    trained = batch["targets"] != IGNORE_INDEX
    owners = batch["sample_ids"][trained]
    plain = torch.zeros(4).index_add(0, owners, plain_token_logps(plain_model, batch))
    assert counts.tolist() == torch.bincount(owners, minlength=4).tolist()
    # A nonlinear function of the sequences' log-probabilities, as DPO's loss is.
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0])
    assert_same(F.logsigmoid(logps * weights * 0.1).sum(), F.logsigmoid(plain * weights * 0.1).sum(), chunked_model, plain_model)


def test_tempered_logps_and_entropy_for_rl_equal_the_plain_ones(tiny_model_dir, batches):
    batch = batches["sft"]
    chunked_model, plain_model = load(tiny_model_dir, True), load(tiny_model_dir, True)
    scored = target_logps(chunked_model, batch, temperature=0.7, entropy=True)
    plain = plain_token_logps(plain_model, batch, temperature=0.7)
    with torch.no_grad():
        trained = batch["targets"] != IGNORE_INDEX
        logits = plain_model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[trained] / 0.7
        entropy = torch.distributions.Categorical(logits=logits).entropy()
    torch.testing.assert_close(scored.entropy, entropy, rtol=1e-5, atol=1e-5)
    assert not scored.entropy.requires_grad
    # Per-token weights, as GRPO's advantages and clipping give.
    weights = torch.linspace(-1, 1, len(plain))
    assert_same((scored.logps.exp() * weights).sum(), (plain.exp() * weights).sum(), chunked_model, plain_model)


def test_greedy_flags_mark_the_targets_that_are_the_likeliest_tokens(tiny_model_dir, batches):
    batch = dict(batches["sft"])
    model = load(tiny_model_dir, False)
    with torch.no_grad():
        likeliest = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits.argmax(dim=-1)
    # Every other target made the likeliest token, so the flags are neither all False nor all True.
    trained = batch["targets"] != IGNORE_INDEX
    targets = batch["targets"].clone()
    chosen = trained & (torch.arange(targets.numel()).view_as(targets) % 2 == 0)
    targets[chosen] = likeliest[chosen]
    batch["targets"] = targets
    expected = (targets == likeliest)[trained]
    assert expected.any() and not expected.all()
    assert torch.equal(target_logps(model, batch, greedy=True).greedy, expected)


class VocabularyShapes(TorchDispatchMode):
    """Every tensor an operation produces whose last dimension is the vocabulary."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.shapes = vocab, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor) and tensor.dim() and tensor.shape[-1] == self.vocab:
                self.shapes.append(tuple(tensor.shape))
        return out


def test_a_training_step_never_holds_the_logits_of_the_whole_batch(tiny_model_dir, batches):
    batch = batches["packed"]
    model = load(tiny_model_dir, True)
    vocab = model.config.vocab_size
    whole = batch["input_ids"].numel() * vocab

    with VocabularyShapes(vocab) as plain:
        plain_token_logps(model, batch).sum().backward()
    assert max(torch.Size(shape).numel() for shape in plain.shapes) >= whole  # the recorder sees the full logits

    with VocabularyShapes(vocab) as chunked:
        causal_lm_loss(model, batch).backward()
    # Forward and backward (where chunks are recomputed) only ever make one chunk's logits
    # (and the head's weight, its transpose and gradient: the vocabulary by the hidden size).
    weight_shape = sorted((vocab, model.config.hidden_size))
    logits_shapes = [shape for shape in chunked.shapes if sorted(shape) != weight_shape]
    assert logits_shapes
    assert max(torch.Size(shape).numel() for shape in logits_shapes) <= CHUNK_TOKENS * vocab


def test_a_model_that_changes_its_logits_after_the_head_is_scored_the_plain_way(tiny_model_dir, batches):
    """Gemma 2 soft-caps its logits after the head; the chunks would score the uncapped ones."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = Gemma2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, final_logit_softcapping=2.0, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(config)
    batch = batches["sft"]
    for _ in range(2):  # the second time, without trying the chunks first
        torch.testing.assert_close(causal_lm_loss(model, batch), -plain_token_logps(model, batch).sum(), rtol=1e-6, atol=1e-6)


class RecordingFusedLoss:
    """A device's fused linear cross-entropy, written here in plain torch, recording its calls."""

    def __init__(self):
        self.calls: list[tuple] = []

    def __call__(self, hidden, weight, targets, bias):
        self.calls.append((tuple(hidden.shape), weight, bias))
        logits = F.linear(hidden, weight, bias).float()
        return F.cross_entropy(logits, targets, reduction="sum")


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_a_device_s_fused_loss_is_used_from_the_second_step_and_equals_plain_cross_entropy(tiny_model_dir, batches, lora):
    batch = batches["packed"]
    fused = RecordingFusedLoss()
    fused_model, plain_model = load(tiny_model_dir, lora), load(tiny_model_dir, lora)
    head = fused_model.get_output_embeddings()
    first = causal_lm_loss(fused_model, batch, fused=fused)  # chunked: it finds out the head's output is the logits
    assert fused.calls == [] and head._tunesmith_chunked is True
    second = causal_lm_loss(fused_model, batch, fused=fused)
    assert [(shape, weight is head.weight) for shape, weight, _ in fused.calls] == [((int(batch["num_target_tokens"]), 64), True)]
    torch.testing.assert_close(second, first, rtol=1e-6, atol=1e-6)
    assert_same(second, -plain_token_logps(plain_model, batch).sum(), fused_model, plain_model)


def test_a_head_that_is_not_a_plain_linear_layer_keeps_the_chunked_loss(tiny_model_dir, batches):
    """A LoRA adapter on the head itself: the fused kernel would see the base weight only."""
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(r=4, target_modules=["lm_head"], init_lora_weights=False))
    fused = RecordingFusedLoss()
    for _ in range(2):
        torch.testing.assert_close(causal_lm_loss(model, batches["sft"], fused=fused), -plain_token_logps(model, batches["sft"]).sum(), rtol=1e-6, atol=1e-6)
    assert fused.calls == []


def test_the_sft_trainer_hands_its_device_s_fused_loss_to_the_loss(tiny_model_dir, batches):
    from tests.helpers import cpu_device
    from tunesmith import TrainerContext
    from tunesmith_trainers.sft import SFTTrainer

    fused, device = RecordingFusedLoss(), cpu_device()
    device.fused_linear_cross_entropy = lambda: fused
    trainer = SFTTrainer(AutoTokenizer.from_pretrained(tiny_model_dir))
    trainer.setup(TrainerContext(strategy=None, device=device, precision="fp32", plugins=None, options={}, make_reference=None))
    model = load(tiny_model_dir, lora=True)
    losses = [trainer.compute_loss(model, batches["sft"]).loss for _ in range(2)]
    assert len(fused.calls) == 1  # the second step's
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=1e-6)
