"""Generation backends: what generates completions for a trainer that samples while it trains.

A GRPO-style trainer generates completions with the policy it is training, then learns from
them. The built-in ``transformers`` backend generates with the training model itself
(:func:`tunesmith.generation.generate_batch`); a plugin may register a faster engine, such as
vLLM on CUDA, that keeps its own copy of the weights and reloads them after each update.
Backends are registered with ``tunesmith_register_generation_backends`` and chosen by name
with :func:`create_generation_backend`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from tunesmith.errors import ConfigError, PluginError

if TYPE_CHECKING:
    import torch

    from tunesmith.device import Device
    from tunesmith.generation import Completion, GenerationOptions
    from tunesmith.plugins import PluginManager

#: the backend a trainer uses unless told otherwise; it runs on every device
DEFAULT_GENERATION_BACKEND = "transformers"


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
            self.model,
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


def create_generation_backend(manager: PluginManager, name: str, model: Any, tokenizer: Any, device: Device) -> GenerationBackend:
    """The registered backend ``name``, made for ``model`` on ``device``.

    Fails, listing what would work, when no backend has that name or it does not run on
    ``device``; an import failure names the plugin that registered it.
    """
    registered = manager.get("generation backend", name)
    devices = registered.spec.devices
    if devices and device.name not in devices:
        fitting = sorted(n for n, r in manager.collect("generation backend").items() if not r.spec.devices or device.name in r.spec.devices)
        raise ConfigError(
            f"generation backend {name!r} runs on {', '.join(devices)}, not on device {device.name!r}; "
            f"backends for {device.name}: {', '.join(fitting) or 'none'}"
        )
    backend_class = registered.load()
    if not (isinstance(backend_class, type) and issubclass(backend_class, GenerationBackend)):
        raise PluginError(
            f"generation backend {name!r} from plugin {registered.plugin} (distribution {registered.distribution}) "
            f"is {backend_class!r}, not a tunesmith.generation_backend.GenerationBackend subclass"
        )
    return backend_class(model, tokenizer, device)
