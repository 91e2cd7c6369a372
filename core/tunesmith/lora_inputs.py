"""What a LoRA adapter's ``lora_A`` reads: the layer input, dropped out, in the compute dtype.

peft casts a LoRA layer's input to the adapter's dtype (fp32) and then applies ``nn.Dropout``.
Under bf16 autocast that costs, per adapted layer and token, an fp32 copy of the input, its
cast back to bf16 for ``lora_A``, and (on CPU, where dropout multiplies by a noise tensor of
the input's dtype) an fp32 noise tensor kept for backward: 6 bytes per element kept and two
full copies made, for each of the seven adapted projections of every transformer layer.

:class:`LoRAInput` replaces peft's dropout: it casts the input straight to the dtype
``lora_A`` computes in (autocast's when autocast is on, the adapter's otherwise) and drops it
out with a boolean mask, which is all backward keeps (1 byte per element). Each element is kept
with probability ``1 - p`` and scaled by its inverse, ``p`` rounded to a multiple of 2^-15.

The mask is drawn 15 bits per element, four elements from each 64-bit draw of the device's
generator, instead of one draw per element as ``bernoulli_`` makes: on CPU the generator is
serial, and drawing one number per element of every adapted layer's input was a sixth of a
LoRA SFT run's time. DoRA layers keep peft's own modules (their forward treats an
``nn.Identity`` dropout specially).
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import nn

_RESOLUTION = 1 << 15


def _drop_threshold(p: float) -> int:
    """``p`` in units of 2^-15: an element is dropped when its 15 random bits fall below it."""
    return min(round(p * _RESOLUTION), _RESOLUTION - 1)


def keep_mask(like: torch.Tensor, threshold: int) -> torch.Tensor:
    """A boolean mask shaped like ``like``, each element ``True`` with probability ``1 - threshold / 2**15``.

    Each 64-bit draw (``random_`` on int64: 63 uniform bits) gives four 16-bit words; the low 15
    bits of each are uniform and independent of the others.
    """
    count = like.numel()
    words = torch.empty(-(-count // 4), dtype=torch.int64, device=like.device).random_().view(torch.int16)
    return (words.bitwise_and_(_RESOLUTION - 1) >= threshold)[:count].view(like.shape)


class _MaskedDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, threshold: int, dtype: torch.dtype) -> torch.Tensor:
        keep = keep_mask(x, threshold)
        ctx.save_for_backward(keep)
        ctx.scale, ctx.input_dtype = _RESOLUTION / (_RESOLUTION - threshold), x.dtype
        return torch.where(keep, x.to(dtype), 0).mul_(ctx.scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        return torch.where(keep, grad, 0).mul_(ctx.scale).to(ctx.input_dtype), None, None


class LoRAInput(nn.Module):
    """Dropout with probability ``p`` that also casts to the dtype ``lora_A`` will compute in."""

    def __init__(self, p: float, adapter_dtype: Callable[[], torch.dtype]):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"LoRA dropout must be at least 0 and below 1, got {p}")
        self.p = p
        self.threshold = _drop_threshold(p)
        #: the dtype ``lora_A``'s weight has now (FSDP's mixed precision casts it for compute)
        self.adapter_dtype = adapter_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device_type = x.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else self.adapter_dtype()
        if self.training and self.threshold > 0:
            return _MaskedDropout.apply(x, self.threshold, dtype)
        return x.to(dtype)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def _weight_dtype(layer: nn.Linear) -> torch.dtype:
    return layer.weight.dtype


def install_lora_inputs(model: nn.Module) -> int:
    """Replace the dropout of every plain LoRA layer in ``model`` with :class:`LoRAInput`; returns how many."""
    from peft.tuners.lora import Linear

    replaced = 0
    for module in model.modules():
        if not isinstance(module, Linear) or module.lora_variant:
            continue
        dropouts = module.lora_dropout
        for adapter, dropout in dropouts.items():
            p = dropout.p if isinstance(dropout, nn.Dropout) else 0.0
            dropouts[adapter] = LoRAInput(p, functools.partial(_weight_dtype, module.lora_A[adapter]))
            replaced += 1
        # LoRAInput casts; peft's own cast to the adapter's dtype would make a copy it undoes.
        module.cast_input_dtype_enabled = False
    return replaced
