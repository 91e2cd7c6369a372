"""Log-probabilities of target tokens, and the causal language-modelling loss built on them.

The batch comes from :func:`tunesmith.data.collate.collate_causal`: ``targets`` are already
shifted per sample, and ``position_ids`` without an attention mask keep packed samples apart.
The summed loss is normalised by the engine over every target token of an optimizer step.

The full-vocabulary logits of a batch are never materialised. While the model runs (called
through its top-level module, so that peft, DDP, FSDP and ZeRO wrappers see the call), its
output head is asked for the target positions only, a chunk of tokens at a time: each chunk's
logits exist in the compute dtype (and one fp32 copy for the log-softmax) only while that
chunk is scored. Peak memory for the loss is then one chunk's logits, not batch x sequence x
vocabulary. Backward needs each chunk's logits again. When the head is trained, they are
recomputed chunk by chunk (:func:`torch.utils.checkpoint.checkpoint`). When it is frozen (LoRA),
each target's log-probability depends on the rest of the model only through its own hidden
state, so the gradient of each log-probability with respect to that state (a hidden-size vector)
is taken while the chunk is scored, and backward only scales it by the gradient that reaches the
log-probability: the chunk's logits are made once, not twice. A model that changes its logits
after the head (Gemma 2's soft-capping, Cohere's logit scale) is detected and scored the plain
way.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from tunesmith.data.types import IGNORE_INDEX
from tunesmith.device import FusedLinearCrossEntropy

#: logits entries (tokens x vocabulary) scored at once: 32M, 128 MiB in fp32
CHUNK_ELEMENTS = 1 << 25


@dataclass
class TargetLogps:
    """What :func:`target_logps` returns, one entry per target token in ``targets != IGNORE_INDEX`` order."""

    logps: torch.Tensor
    #: each position's entropy of the (tempered) next-token distribution, without gradient; None unless asked for
    entropy: torch.Tensor | None = None
    #: whether each target is the likeliest next token (what greedy decoding picks); None unless asked for
    greedy: torch.Tensor | None = None


def target_logps(
    model: torch.nn.Module, batch: dict[str, Any], temperature: float = 1.0, entropy: bool = False, greedy: bool = False
) -> TargetLogps:
    """Log-probability of every target token under ``softmax(logits / temperature)``, in fp32, (T,)."""
    targets = batch["targets"]
    trained = targets != IGNORE_INDEX
    head = _output_head(model)
    chunked = getattr(head, "_tunesmith_chunked", None)
    if head is not None and chunked is not False:
        scorer = _ChunkedScorer(trained, targets[trained], temperature, entropy, greedy, _vocab_size(model), _head_is_frozen(head))
        with _scoring_head(head, scorer):
            logps = _forward(model, batch).logits
        if chunked is None:
            # Once per model: does it hand the head's output back unchanged? One that changes it
            # (soft-capping, a logit scale) had its chunks scored on the wrong logits, and is
            # scored the plain way from now on.
            chunked = head._tunesmith_chunked = logps.shape == scorer.result.shape and torch.allclose(logps, scorer.result, rtol=0, atol=0, equal_nan=True)
        if chunked:
            return TargetLogps(logps, scorer.entropy, scorer.greedy)
    logits = _at_least_fp32(_forward(model, batch).logits[trained]) / temperature
    logps = -F.cross_entropy(logits, targets[trained], reduction="none")
    return TargetLogps(logps, _entropy(logits) if entropy else None, _greedy(logits, targets[trained]) if greedy else None)


def causal_lm_loss(model: torch.nn.Module, batch: dict[str, Any], fused: FusedLinearCrossEntropy | None = None) -> torch.Tensor:
    """Cross-entropy in fp32 summed over the batch's target tokens.

    ``fused`` (a device's :meth:`tunesmith.Device.fused_linear_cross_entropy`, such as Liger's
    kernel on CUDA) computes it from the target positions' hidden states and the head's weight,
    where the head is a plain linear layer and the model is known to hand its output back
    unchanged (the chunked loss finds that out on its first call, so the first step is chunked).
    """
    head = _output_head(model)
    if fused is None or type(head) is not torch.nn.Linear or getattr(head, "_tunesmith_chunked", None) is not True:
        return -target_logps(model, batch).logps.sum()
    targets = batch["targets"]
    scorer = _FusedScorer(head, fused, targets != IGNORE_INDEX, targets[targets != IGNORE_INDEX])
    with _scoring_head(head, scorer):
        _forward(model, batch)
    return scorer.loss.float()


def sequence_logps(model: torch.nn.Module, batch: dict[str, Any], num_sequences: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sample's summed log-probability of its target tokens, and how many there are: two (N,) tensors.

    Samples are numbered by ``batch["sample_ids"]`` (:func:`tunesmith.data.collate.collate_causal`);
    only target positions count, so padding and untrained prompt tokens add nothing.
    """
    token_logps = target_logps(model, batch).logps
    owners = batch["sample_ids"][batch["targets"] != IGNORE_INDEX].to(token_logps.device)
    logps = torch.zeros(num_sequences, dtype=token_logps.dtype, device=token_logps.device).index_add(0, owners, token_logps)
    counts = torch.zeros(num_sequences, dtype=torch.long, device=owners.device).index_add(0, owners, torch.ones_like(owners))
    return logps, counts


def per_token_losses(model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """The fp32 cross-entropy of every position, (B, L); 0 where there is no target."""
    targets = batch["targets"]
    token_logps = target_logps(model, batch).logps
    losses = torch.zeros(targets.shape, dtype=token_logps.dtype, device=token_logps.device)
    return losses.masked_scatter(targets.to(losses.device) != IGNORE_INDEX, -token_logps)


class _ChunkedScorer:
    """Stands in for the head's forward: scores the target positions of its input, chunk by chunk."""

    def __init__(
        self, trained: torch.Tensor, targets: torch.Tensor, temperature: float, entropy: bool, greedy: bool, vocab_size: int, frozen_head: bool
    ):
        self.trained, self.targets, self.frozen_head = trained, targets, frozen_head
        self.temperature, self.want_entropy, self.want_greedy = temperature, entropy, greedy
        self.chunk_tokens = max(1, CHUNK_ELEMENTS // vocab_size)
        self.result: torch.Tensor | None = None
        self.entropy: torch.Tensor | None = None
        self.greedy: torch.Tensor | None = None

    def __call__(self, head_forward: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden[self.trained.to(hidden.device)]
        targets = self.targets.to(hidden.device)
        recompute = torch.is_grad_enabled() and hidden.requires_grad
        logps, entropies, greedy = [], [], []
        # At least one chunk, also of no tokens, so the head's weights always take part in the
        # graph (DDP expects a gradient, even a zero one, for every parameter).
        for start in range(0, max(len(hidden), 1), self.chunk_tokens):
            piece = (head_forward, hidden[start : start + self.chunk_tokens], targets[start : start + self.chunk_tokens])
            if recompute and self.frozen_head:
                chunk_logps, chunk_entropy, chunk_greedy = _ScoredWithSlopes.apply(piece[1], functools.partial(self._score, head_forward, targets=piece[2]))
            elif recompute:
                chunk_logps, chunk_entropy, chunk_greedy = checkpoint(self._score, *piece, use_reentrant=False)
            else:
                chunk_logps, chunk_entropy, chunk_greedy = self._score(*piece)
            logps.append(chunk_logps)
            entropies.append(chunk_entropy)
            greedy.append(chunk_greedy)
        self.result = torch.cat(logps)
        self.entropy = torch.cat(entropies) if self.want_entropy else None
        self.greedy = torch.cat(greedy) if self.want_greedy else None
        return self.result

    def _score(self, head_forward, hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        logits = _at_least_fp32(head_forward(hidden)) / self.temperature
        logps = -F.cross_entropy(logits, targets, reduction="none")
        return logps, _entropy(logits) if self.want_entropy else None, _greedy(logits, targets) if self.want_greedy else None


class _FusedScorer:
    """Stands in for the head's forward: the summed loss of its target positions, by a fused kernel."""

    def __init__(self, head: torch.nn.Linear, fused: FusedLinearCrossEntropy, trained: torch.Tensor, targets: torch.Tensor):
        self.head, self.fused, self.trained, self.targets = head, fused, trained, targets
        self.loss: torch.Tensor | None = None

    def __call__(self, head_forward: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden[self.trained.to(hidden.device)]
        self.loss = self.fused(hidden, self.head.weight, self.targets.to(hidden.device), self.head.bias)
        return self.loss.reshape(1)  # what the model returns as its logits, unused


class _ScoredWithSlopes(torch.autograd.Function):
    """A frozen head's scores of a chunk, with each log-probability's gradient by its hidden state kept for backward."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, score: Callable[[torch.Tensor], tuple]) -> tuple:
        with torch.enable_grad():
            leaf = hidden.detach().requires_grad_()
            logps, entropy, greedy = score(leaf)
            # Each log-probability depends on its own row of ``leaf`` only: the gradient of their
            # sum holds, row by row, each one's gradient by its hidden state.
            (slopes,) = torch.autograd.grad(logps.sum(), leaf)
        ctx.save_for_backward(slopes)
        outputs = (logps.detach(), entropy, greedy)
        ctx.mark_non_differentiable(*(t for t in outputs[1:] if t is not None))
        return outputs

    @staticmethod
    def backward(ctx, grad_logps: torch.Tensor, *_) -> tuple:
        (slopes,) = ctx.saved_tensors
        return (slopes * grad_logps[:, None]).to(slopes.dtype), None


def _head_is_frozen(head: torch.nn.Module) -> bool:
    """No parameter of ``head`` is trained, and no wrapper (FSDP, ZeRO-3) hooks its calls to gather or free them."""
    parameters = list(head.parameters())
    return (
        not any(p.requires_grad for p in parameters)
        and not head._forward_pre_hooks
        and not head._forward_hooks
        and all(type(p) in (torch.Tensor, torch.nn.Parameter) and not hasattr(p, "ds_id") for p in parameters)
    )


def _at_least_fp32(logits: torch.Tensor) -> torch.Tensor:
    """The compute dtype's logits in fp32 for the log-softmax (fp64 ones stay fp64)."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        log_probs = torch.log_softmax(logits, dim=-1)
        return -(log_probs.exp() * log_probs).sum(dim=-1)


def _greedy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return logits.argmax(dim=-1) == targets


@contextmanager
def _scoring_head(head: torch.nn.Module, scorer: _ChunkedScorer | _FusedScorer) -> Iterator[None]:
    """Route the head's forward through ``scorer`` (its hooks, e.g. FSDP's or ZeRO-3's gathering, still run)."""
    own_forward = "forward" in vars(head)
    original = head.forward
    head.forward = lambda hidden: scorer(original, hidden)
    try:
        yield
    finally:
        if own_forward:
            head.forward = original
        else:
            del head.forward


def _forward(model: torch.nn.Module, batch: dict[str, Any]):
    # Through the top-level module, never its parts, so that peft and DDP/FSDP wrappers see the call.
    return model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DDP's or DeepSpeed's wrapper (both keep it as ``.module``)."""
    while isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return model


def _output_head(model: torch.nn.Module) -> torch.nn.Module | None:
    getter = getattr(_unwrapped(model), "get_output_embeddings", None)
    return getter() if getter is not None else None


def _vocab_size(model: torch.nn.Module) -> int:
    config = _unwrapped(model).config
    return config.get_text_config().vocab_size
