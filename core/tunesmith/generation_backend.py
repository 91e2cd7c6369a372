"""Generation backends: what generates completions for a trainer that samples while it trains.

A GRPO-style trainer generates completions with the policy it is training, then learns from
them. The built-in ``transformers`` backend generates with the training model itself
(:func:`tunesmith.generation.generate_batch`); a plugin may register a faster engine, such as
vLLM on CUDA, that keeps its own copy of the weights and reloads them after each update.
Backends are registered with ``tunesmith_register_generation_backends`` and chosen by name
with :func:`create_generation_backend`; ``auto`` picks the built-in ``merged`` backend for a
LoRA policy held whole by each process, else ``transformers``.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from tunesmith.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from tunesmith.device import Device
    from tunesmith.generation import Completion, GenerationOptions
    from tunesmith.plugins import PluginManager

#: the backend a trainer uses unless told otherwise; it runs on every device
DEFAULT_GENERATION_BACKEND = "transformers"
#: the backend name that picks ``merged`` where it applies (:func:`can_merge_adapters`), else the default
AUTO = "auto"


class GenerationBackend(ABC):
    """Generates completions of token-id prompts with the policy being trained.

    Made once per training process, after the strategy has placed the model, as
    ``Backend(model, tokenizer, device)``: the model unwrapped from its strategy
    (``strategy.unwrap(model)``; a peft model stays a peft model), its tokenizer and the
    :class:`tunesmith.device.Device` it trains on.
    """

    def __init__(self, model: Any, tokenizer: Any, device: Device):
        self.model = model
        self.tokenizer = tokenizer
        self.device = device

    @abstractmethod
    def generate(
        self,
        prompts: list[list[int]],
        options: GenerationOptions,
        *,
        num_return_sequences: int = 1,
        generator: torch.Generator | None = None,
        stop_strings: Sequence[str] = (),
        all_finished: Callable[[bool], bool] | None = None,
    ) -> list[Completion]:
        """Completions of every prompt, prompt-major, as :func:`tunesmith.generation.generate_batch`
        defines them. A backend that does not run the training model's forward passes itself
        may ignore ``all_finished``; one that cannot take ``generator`` must still never draw
        from torch's global RNG."""

    @abstractmethod
    def sync_weights(self, model: Any) -> None:
        """Called after every optimizer update with the unwrapped model: from now on, generate
        with its new weights. A backend holding its own copy of the weights loads them here."""


class TransformersBackend(GenerationBackend):
    """Generates with the training model itself, so its weights are always the current ones."""

    def generate(
        self,
        prompts: list[list[int]],
        options: GenerationOptions,
        *,
        num_return_sequences: int = 1,
        generator: torch.Generator | None = None,
        stop_strings: Sequence[str] = (),
        all_finished: Callable[[bool], bool] | None = None,
    ) -> list[Completion]:
        from tunesmith.generation import generate_batch

        return generate_batch(
            self.generating_model(),
            self.tokenizer,
            prompts,
            options,
            num_return_sequences=num_return_sequences,
            generator=generator,
            stop_strings=stop_strings,
            all_finished=all_finished,
        )

    def sync_weights(self, model: Any) -> None:
        self.model = model

    def generating_model(self) -> Any:
        """The model the next generation runs."""
        return self.model


class MergedLoRABackend(TransformersBackend):
    """Generates with a copy of the policy whose LoRA adapters are merged into its weights.

    A decode step of a small batch is many small operations, and an unmerged adapter adds
    several to every adapted layer; merged, each layer is one matrix product again (on a CPU,
    LoRA rollouts of SmolLM2-135M run about twice as fast). The copy costs the memory of the
    model once more. Before a generation after the policy changed, each adapted weight of the
    copy is set to the policy's frozen weight plus its adapter's product (summed in fp32, then
    stored in the weight's dtype), so the copy always generates with the current policy.
    """

    def __init__(self, model: Any, tokenizer: Any, device: Device):
        super().__init__(model, tokenizer, device)
        reason = _why_not_mergeable(model)
        if reason:
            raise ConfigError(f"generation backend 'merged': {reason}; use --generation-backend transformers")
        self.merged = copy.deepcopy(model).merge_and_unload()
        self.stale = True

    def generating_model(self) -> Any:
        if self.stale:
            self._merge()
        return self.merged

    def sync_weights(self, model: Any) -> None:
        self.model, self.stale = model, True

    def _merge(self) -> None:
        import torch

        with torch.no_grad():
            for name, weight in generation_weights(self.model):
                self.merged.get_parameter(name).copy_(weight)
        self.stale = False


def can_merge_adapters(model: Any) -> bool:
    """Whether :class:`MergedLoRABackend` can generate for ``model`` (an unwrapped policy)."""
    return not _why_not_mergeable(model)


def generation_weights(model: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """What a copy of the policy kept for generation must load after an update, by the names
    of the model's own checkpoint (``model.layers.0.self_attn.q_proj.weight``).

    For a LoRA policy (one :class:`MergedLoRABackend` takes), each adapted layer's weight with
    its adapters merged in (summed in fp32, returned in the weight's dtype): the rest is the
    frozen base model the copy was made from. For any other model, every parameter, detached.
    Weights are computed one at a time, as they are consumed; call under ``torch.no_grad()``.
    """
    if not _lora_layers(model):
        for name, parameter in model.named_parameters():
            yield name, parameter.detach()
        return
    reason = _why_not_mergeable(model)
    if reason:
        raise ConfigError(f"the policy's adapters cannot be merged for generation: {reason}")
    for name, layer in _lora_layers(model):
        base = layer.get_base_layer().weight
        delta = sum(layer.get_delta_weight(adapter).float() for adapter in layer.active_adapters)
        yield f"{name}.weight", (base.float() + delta).to(base.dtype)


def _lora_layers(model: Any) -> list[tuple[str, Any]]:
    """The peft LoRA layers of ``model``, by their names in the model without peft's wrapper."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    if not isinstance(model, PeftModel):
        return []
    return [(name, module) for name, module in model.get_base_model().named_modules() if isinstance(module, LoraLayer)]


def _why_not_mergeable(model: Any) -> str | None:
    layers = _lora_layers(model)
    if not layers:
        return "the policy has no LoRA adapter to merge"
    if any(any(layer.use_dora.get(adapter, False) for adapter in layer.active_adapters) for _, layer in layers):
        return "DoRA adapters are not merged by this backend"
    adapter_parameters = {id(p) for _, layer in layers for p in [*layer.lora_A.parameters(), *layer.lora_B.parameters()]}
    if any(p.requires_grad and id(p) not in adapter_parameters for p in model.parameters()):
        return "the policy trains weights besides its LoRA adapters (modules_to_save), which the copy would not follow"
    if any(type(p).__name__ == "DTensor" or p.numel() == 0 for p in model.parameters()):
        return "the policy's weights are sharded across processes (fsdp, zero3); it needs them whole in each process"
    return None


def create_generation_backend(manager: PluginManager, name: str, model: Any, tokenizer: Any, device: Device) -> GenerationBackend:
    """The registered backend ``name``, made for ``model`` on ``device``.

    Fails, listing what would work, when no backend has that name or it does not run on
    ``device``; an import failure names the plugin that registered it.
    """
    if name == AUTO:
        name = "merged" if can_merge_adapters(model) else DEFAULT_GENERATION_BACKEND
    backend_class = manager.load_class("generation backend", name, GenerationBackend, device.name)
    return backend_class(model, tokenizer, device)
