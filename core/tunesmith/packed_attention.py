"""Attention over packed rows, each sample on its own, without a (B, 1, L, L) mask.

A packed row holds several samples; :func:`tunesmith.data.collate.collate_causal` restarts
``position_ids`` at each. Given such rows, transformers' ``sdpa`` builds a dense block-diagonal
mask, and the attention kernel then computes every query against every key of the row and
masks most of it away: on a CPU, 2048-token rows of 100-500-token samples take six times as
long as their samples would alone, and the mask grows with the square of the row.

``packed_sdpa`` is transformers' ``sdpa`` with one change: when there is no padding mask and a
row's ``position_ids`` restart, the row's queries, keys and values are split where each sample
begins, and each sample runs torch's ``scaled_dot_product_attention`` with ``is_causal`` (the
layer's scaling and dropout; grouped key/value heads through ``enable_gqa``). Everything else
(padded batches with a mask, generation with a cache) goes to ``sdpa`` unchanged. It is registered with transformers' attention and
mask interfaces under :data:`PACKED_SDPA`, and :func:`use_packed_sdpa` gives it to a model
whose attention is plain causal everywhere: sliding-window and chunked attention need masks
within a sample, so those models keep ``sdpa``.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.nn.functional as F

#: the ``attn_implementation`` name transformers knows it by
PACKED_SDPA = "packed_sdpa"

#: the last ``position_ids`` split, and the sample lengths found in it: every layer of a forward
#: pass (and its recompute under activation checkpointing) sees the same tensor
_last_split: tuple[Any, int, list[int] | None] = (None, -1, None)


def use_packed_sdpa(model: Any) -> bool:
    """Give ``model`` (loaded with ``sdpa``) the ``packed_sdpa`` attention where it applies; whether it did."""
    if getattr(model.config, "_attn_implementation", None) != "sdpa" or not _plain_causal(model.config):
        return False
    _register()
    model.set_attn_implementation(PACKED_SDPA)
    return model.config._attn_implementation == PACKED_SDPA


def packed_sdpa_attention(module, query, key, value, attention_mask, **kwargs):
    """transformers' ``sdpa`` attention, run per sample for packed rows without a padding mask."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    batch, _, length, _ = query.shape
    if attention_mask is not None or length == 1 or key.shape[2] != length:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if "position_ids" not in kwargs:
        raise RuntimeError(
            f"packed_sdpa: {type(module).__name__} passes no position_ids to its attention, so the samples of a packed "
            "row cannot be told apart; load the model with attn_implementation='sdpa'"
        )
    lengths = sample_lengths(kwargs["position_ids"], batch)
    if lengths is None:
        return sdpa_attention_forward(module, query, key, value, None, **kwargs)
    options = {"dropout_p": kwargs.get("dropout", 0.0), "scale": kwargs.get("scaling"), "is_causal": True,
               "enable_gqa": query.shape[1] != key.shape[1]}
    pieces = zip(*(_samples(states, lengths) for states in (query, key, value)))
    outputs = torch.cat([F.scaled_dot_product_attention(q, k, v, **options) for q, k, v in pieces], dim=2)
    heads, dim = query.shape[1], query.shape[3]
    return outputs.view(heads, batch, length, dim).permute(1, 2, 0, 3).contiguous(), None


def packed_sdpa_mask(*, q_length: int, kv_length: int, attention_mask=None, q_offset=0, kv_offset=0, **kwargs):
    """No mask where :func:`packed_sdpa_attention` finds each sample itself; ``sdpa``'s mask otherwise."""
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None and q_length == kv_length and _is_zero(q_offset) and _is_zero(kv_offset):
        return None
    return sdpa_mask(q_length=q_length, kv_length=kv_length, attention_mask=attention_mask, q_offset=q_offset, kv_offset=kv_offset, **kwargs)


def sample_lengths(position_ids: torch.Tensor, batch: int) -> list[list[int]] | None:
    """The lengths of the samples of each of ``batch`` rows (a sample begins where a row begins
    or its positions do not go on by one); None when each row is one sample."""
    global _last_split
    holder, version, lengths = _last_split
    if holder is not None and holder() is position_ids and version == position_ids._version:
        return lengths
    positions = position_ids.expand(batch, -1)
    begins = torch.ones_like(positions, dtype=torch.bool)
    begins[:, 1:] = positions[:, 1:] - positions[:, :-1] != 1
    starts = begins.nonzero().tolist()
    lengths = None
    if len(starts) > batch:
        lengths = [[] for _ in range(batch)]
        for (row, start), (next_row, end) in zip(starts, [*starts[1:], (batch, 0)]):
            lengths[row].append((end if next_row == row else positions.shape[1]) - start)
    _last_split = (weakref.ref(position_ids), position_ids._version, lengths)
    return lengths


def _samples(states: torch.Tensor, lengths: list[list[int]]) -> list[torch.Tensor]:
    """(B, H, L, D) states as (1, H, length, D) views, one per sample, row by row.

    Split, not indexed: backward then puts the pieces' gradients together in one tensor,
    instead of adding a zero-filled (B, H, L, D) tensor for each piece.
    """
    return [piece for row, row_lengths in zip(states.split(1), lengths) for piece in row.split(row_lengths, dim=2)]


def _is_zero(offset) -> bool:
    return not (offset.any() if isinstance(offset, torch.Tensor) else offset)


def _plain_causal(config) -> bool:
    """Whether every layer of the model attends causally to the whole of its sample and nothing else."""
    if not getattr(config, "is_causal", True) or getattr(config, "attention_chunk_size", None):
        return False
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return all(kind == "full_attention" for kind in layer_types)
    return getattr(config, "sliding_window", None) is None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
    AttentionMaskInterface.register(PACKED_SDPA, packed_sdpa_mask)
