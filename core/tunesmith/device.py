"""The ``Device`` interface: everything tunesmith needs to know about one hardware family.

Shaped like Lightning Fabric's accelerators. A device class is instantiated once per process
after selection; availability is answered beforehand by the cheap probe in its
:class:`tunesmith.records.DeviceSpec`, never by this class, and what the hardware can do is
declared there too (:class:`tunesmith.records.DeviceCapabilities`), so that it can be read,
checked and printed without importing the device.
"""

from __future__ import annotations

import contextlib
import functools
import random
from abc import ABC, abstractmethod
from typing import Any, Callable

import torch

from tunesmith.records import DeviceCapabilities

#: what :meth:`Device.fused_linear_cross_entropy` returns
FusedLinearCrossEntropy = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]

PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Device(ABC):
    #: registered name (``cpu``, ``cuda``, ``fake`` ...), set by :func:`tunesmith.plugins.build_device`
    name: str = ""
    #: what the plugin declared in its :class:`~tunesmith.records.DeviceSpec`, set by ``build_device``
    capabilities: DeviceCapabilities = DeviceCapabilities()
    #: values of the options the device declares (``{"liger": True}``), set by ``build_device``
    options: dict[str, Any] = {}
    #: torch device type (``"cpu"``, ``"cuda"``, ``"npu"``, ``"mps"``)
    type: str = "cpu"

    @property
    def distributed_backend(self) -> str | None:
        """torch.distributed backend for this hardware (``gloo``, ``nccl``, ``hccl``), or None for one process only."""
        return self.capabilities.distributed_backend

    @staticmethod
    @abstractmethod
    def device_count() -> int:
        """How many devices of this family this machine has."""

    @abstractmethod
    def setup(self, local_rank: int = 0) -> torch.device:
        """Prepare the device for this process's local rank and return its ``torch.device``."""

    def synchronize(self) -> None:
        """Wait for queued work to finish (a no-op where work is synchronous)."""

    def memory_stats(self) -> dict[str, int]:
        """Bytes in use and peak for this process, as ``{"allocated": n, "peak": n}``."""
        return {}

    def empty_cache(self) -> None:
        """Return cached, unused memory to the system."""

    def supported_precisions(self) -> tuple[str, ...]:
        """Precisions ``--precision`` may choose on this device here: the declared ones, narrowed where the hardware lacks one."""
        return self.capabilities.precisions

    def default_precision(self) -> str:
        """What ``--precision auto`` resolves to: the fastest precision the hardware computes natively."""
        return "fp32"

    def resolve_precision(self, requested: str, training: bool = False) -> str:
        """The precision ``--precision requested`` means here; refused with what would work when the device cannot."""
        from tunesmith.errors import ConfigError

        precision = self.default_precision() if requested == "auto" else requested
        supported = self.supported_precisions()
        if precision not in supported:
            declared = "" if precision not in self.capabilities.precisions else " (not on this machine)"
            raise ConfigError(
                f"--precision {requested}: device {self.name!r} cannot compute in {precision}{declared}; "
                f"it supports {', '.join(supported)}, or auto ({self.default_precision()})"
            )
        if training and precision == "fp16" and not self.capabilities.grad_scaler:
            raise ConfigError(
                f"--precision fp16: training in fp16 needs loss scaling, which device {self.name!r} does not offer; "
                f"use {' or '.join(p for p in supported if p != 'fp16')}"
            )
        return precision

    def precision_advice(self, precision: str, training: bool) -> str | None:
        """A note for a user who chose ``precision`` here, when it works but a better choice exists; None otherwise."""
        return None

    def grad_scaler(self, precision: str) -> torch.amp.GradScaler:
        """The loss scaler for training in ``precision``: active for fp16, a pass-through otherwise."""
        return torch.amp.GradScaler(self.type, enabled=precision == "fp16")

    # -- the model on this hardware ------------------------------------------------------------
    def check_options(self) -> None:
        """Refuse option values that cannot work here (a kernel package that is missing), before anything loads."""

    def attention_implementation(self) -> str:
        """The transformers ``attn_implementation`` models use on this device."""
        return "sdpa"

    def quantization_config(self, adapter: str) -> Any:
        """The transformers quantisation config that loads weights for ``adapter`` (``"qlora"``).

        Called only for an adapter the capabilities declare in ``quantization``.
        """
        raise NotImplementedError(f"device {self.name!r} declares {adapter!r} but does not say how to quantise for it")

    def fused_linear_cross_entropy(self) -> FusedLinearCrossEntropy | None:
        """A kernel for the causal-LM loss that never makes the logits: ``fn(hidden, weight, targets,
        bias)`` returns the cross-entropy of ``hidden @ weight.T + bias`` (``hidden`` (N, H), one
        row per target token, ``targets`` (N,)) summed over the rows, with gradients for
        ``hidden`` and a trained ``weight``. None (the default): tunesmith's chunked loss."""
        return None

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """Adapt a loaded model to the hardware before adapters are added (fused kernels, say)."""
        return model

    def autocast(self, precision: str):
        """A context manager running the forward pass in ``precision`` (mixed precision)."""
        if precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.type, dtype=PRECISION_DTYPES[precision])

    def seed(self, seed: int) -> None:
        """Seed every random generator that affects training."""
        random.seed(seed)
        torch.manual_seed(seed)

    def get_rng_state(self) -> dict[str, Any]:
        """Random-generator states, saved in checkpoints (tensors and plain Python values only)."""
        return {"python": _python_state_to_list(random.getstate()), "torch": torch.get_rng_state()}

    def set_rng_state(self, state: dict[str, Any]) -> None:
        random.setstate(_python_state_from_list(state["python"]))
        torch.set_rng_state(state["torch"])

    def explain_error(self, error: Exception) -> str | None:
        """What an exception the hardware raised means to a user and how to get past it; None when it is not one.

        A training command shows this message instead of reporting a bug (an operator the
        device lacks, say, with the setting that lets it fall back).
        """
        return None

    def describe(self) -> str:
        """One line for the run log."""
        return f"{self.name} ({self.type}, {self.device_count()} device(s), backend {self.distributed_backend})"


@functools.cache
def widest_float(device: torch.device) -> torch.dtype:
    """float64 where ``device`` computes in it, else float32 (Apple's MPS has no float64).

    For sums that must not lose small terms: a step's losses, sampling's running sum. Answered
    by making a float64 tensor there, once per device.
    """
    try:
        torch.empty((), dtype=torch.float64, device=device)
    except (TypeError, RuntimeError):
        return torch.float32
    return torch.float64


def _python_state_to_list(state) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _python_state_from_list(state) -> tuple:
    version, internal, gauss = state
    return (version, tuple(internal), gauss)
