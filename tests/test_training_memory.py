"""What a training step keeps in memory: the dtype of the frozen weights, what the LoRA path saves
for backward, and what gradient checkpointing leaves saved. Measured as bytes of tensors saved
for backward (``saved_tensors_hooks``), which is deterministic, never as time or resident size."""

from __future__ import annotations

import pytest
import torch

from tunesmith.engine import frozen_weights_dtype
from tunesmith.lora_inputs import LoRAInput, keep_mask
from tunesmith.models import apply_adapter, load_model
from tunesmith.strategies.fsdp import FSDPStrategy
from tunesmith.strategy import SingleDeviceStrategy


class SavedForBackward:
    """Records the tensors autograd keeps for backward while the context is open."""

    def __init__(self):
        self.tensors: list[torch.Tensor] = []
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._keep, lambda tensor: tensor)

    def _keep(self, tensor: torch.Tensor) -> torch.Tensor:
        self.tensors.append(tensor)
        return tensor

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)

    def bytes(self, exclude: set[int] = frozenset()) -> int:
        """Bytes of distinct storages kept, leaving out the storages in ``exclude`` (parameters)."""
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in self.tensors}
        return sum(size for pointer, size in storages.items() if pointer not in exclude)


def test_lora_dropout_keeps_only_a_boolean_mask_and_computes_in_the_autocast_dtype():
    torch.manual_seed(0)
    x = torch.randn(64, 32, requires_grad=True)
    dropout = LoRAInput(0.5, lambda: torch.float32).train()
    with SavedForBackward() as saved, torch.autocast("cpu", dtype=torch.bfloat16):
        out = dropout(x)
    assert out.dtype == torch.bfloat16
    assert [t.dtype for t in saved.tensors] == [torch.bool]
    kept = out != 0
    assert 0.3 < kept.float().mean() < 0.7
    assert torch.allclose(out[kept].float(), (x[kept] * 2).bfloat16().float())
    out.float().sum().backward()
    assert x.grad.dtype == torch.float32
    assert torch.equal(x.grad, kept.float() * 2)


@pytest.mark.parametrize("p", [0.05, 0.5])
def test_lora_dropout_drops_each_element_independently_with_probability_p(p):
    """Four elements come from each 64-bit draw: each drops with p, and no two of a draw drop together more often."""
    torch.manual_seed(0)
    count = 1_000_000
    keep = keep_mask(torch.empty(count), round(p * 2**15)).view(-1, 4).double()
    tolerance = 5 * (p * (1 - p) / (count / 4)) ** 0.5  # five standard deviations of one word position's mean
    assert torch.allclose(1 - keep.mean(dim=0), torch.full((4,), p, dtype=torch.double), atol=tolerance)
    both_kept = (keep[:, :, None] * keep[:, None, :]).mean(dim=0)  # pairs of word positions within a draw
    off_diagonal = both_kept[~torch.eye(4, dtype=torch.bool)]
    assert torch.allclose(off_diagonal, torch.full_like(off_diagonal, (1 - p) ** 2), atol=tolerance)
    torch.manual_seed(0)
    assert torch.equal(keep_mask(torch.empty(count), round(p * 2**15)).view(-1, 4).double(), keep)  # the seeded generator's


def test_lora_input_without_dropout_or_in_eval_is_a_cast_and_no_copy_when_the_dtype_matches():
    x = torch.randn(8, 4).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert LoRAInput(0.0, lambda: torch.float32).train()(x) is x
        assert LoRAInput(0.5, lambda: torch.float32).eval()(x) is x
    assert LoRAInput(0.0, lambda: torch.float32)(x).dtype == torch.float32  # no autocast: the adapter's dtype


def test_frozen_weights_are_bf16_only_for_adapters_trained_in_bf16_on_replicating_strategies():
    assert frozen_weights_dtype("lora", "bf16", SingleDeviceStrategy) == torch.bfloat16
    assert frozen_weights_dtype("dora", "bf16", SingleDeviceStrategy) == torch.bfloat16
    assert frozen_weights_dtype("lora", "fp32", SingleDeviceStrategy) == torch.float32
    assert frozen_weights_dtype("lora", "fp16", SingleDeviceStrategy) == torch.float32
    assert frozen_weights_dtype("full", "bf16", SingleDeviceStrategy) == torch.float32
    assert frozen_weights_dtype("lora", "bf16", FSDPStrategy) == torch.float32


@pytest.mark.parametrize("adapter", ["lora", "dora"])
def test_an_adapter_on_bf16_weights_trains_fp32_weights_and_saves_nothing_from_the_base(tiny_model_dir, adapter):
    model = apply_adapter(load_model(tiny_model_dir, dtype=torch.bfloat16), adapter, 4, 8, 0.1)
    trained = {name: p.dtype for name, p in model.named_parameters() if p.requires_grad}
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    assert trained and set(trained.values()) == {torch.float32}
    assert frozen == {torch.bfloat16}
    model.train()
    batch = torch.randint(0, 100, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


def test_the_rm_score_head_peft_copies_from_a_bf16_base_is_trained_in_fp32(tiny_model_dir):
    model = load_model(tiny_model_dir, dtype=torch.bfloat16, model_kind="sequence_classification", pad_token_id=0)
    model = apply_adapter(model, "lora", 4, 8, 0.0, model_kind="sequence_classification")
    trained = {name: p.dtype for name, p in model.named_parameters() if p.requires_grad}
    assert any("score" in name for name in trained)
    assert set(trained.values()) == {torch.float32}


def peak_tensor_bytes(step) -> int:
    """The most bytes of CPU tensors alive at once while ``step()`` runs, from the profiler's allocation records."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        step()
    allocations = sorted(
        (e for e in profiler.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
    )
    live = peak = 0
    for allocation in allocations:
        live += allocation.nbytes()
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_gradient_checkpointing_lowers_the_peak_of_a_lora_step_by_more_than_half(precision):
    from transformers import LlamaConfig, LlamaForCausalLM

    from tunesmith.engine import enable_activation_checkpointing

    def lora_step_peak(checkpointing: bool) -> int:
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=128,
            hidden_size=64,
            intermediate_size=256,
            num_hidden_layers=6,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
        model = apply_adapter(
            LlamaForCausalLM(config).to(frozen_weights_dtype("lora", precision, SingleDeviceStrategy)), "lora", 4, 8, 0.05
        )
        if checkpointing:
            enable_activation_checkpointing(model)
        model.train()
        input_ids = torch.randint(0, 128, (4, 256))

        def step():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = model(input_ids=input_ids, labels=input_ids, use_cache=False).loss
            loss.backward()

        return peak_tensor_bytes(step)

    assert lora_step_peak(checkpointing=True) < 0.5 * lora_step_peak(checkpointing=False)


@pytest.mark.parametrize(
    ("options", "checkpointing", "released"),
    [
        (["--low-memory", "--no-release-memory"], True, True),
        ([], False, True),
        (["--no-release-memory"], False, False),
    ],
)
def test_low_memory_checkpoints_and_training_returns_freed_memory_unless_told_not_to(
    tiny_model_dir, tmp_path, monkeypatch, options, checkpointing, released
):
    from tests.helpers import chat_rows, run_cli, write_jsonl
    from tunesmith import engine

    checkpointed, releases = [], []
    real = engine.enable_activation_checkpointing
    monkeypatch.setattr(engine, "enable_activation_checkpointing", lambda model: (checkpointed.append(model), real(model)))
    monkeypatch.setattr(engine, "return_large_blocks_to_the_system", lambda: releases.append(True))
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(4))
    assert (
        run_cli(
            "sft", "--model", tiny_model_dir, "--dataset", data, "--output-dir", tmp_path / "run", "--max-steps", "1", *options
        )
        == 0
    )
    assert len(checkpointed) == checkpointing and releases == [True] * released
    if checkpointing:
        assert any(getattr(module, "gradient_checkpointing", False) for module in checkpointed[0].modules())
