"""Kahneman-Tversky Optimization (Ethayarajh et al., 2024) on unpaired, labelled completions.

Each row is one completion to a prompt, labelled desirable (``label: true``) or undesirable.
With ``r(x, y) = log pi(y|x) - log ref(y|x)`` (sums over the completion's tokens, the policy
against the reference model: the policy's base with its adapter off, or ``--ref-model``) and
the reference point ``z_ref`` (below), the loss of one completion is

- desirable: ``lambda_D * (1 - sigmoid(beta * (r(x, y) - z_ref)))``
- undesirable: ``lambda_U * (1 - sigmoid(beta * (z_ref - r(x, y))))``

with ``beta`` = ``--beta``, ``lambda_D`` = ``--desirable-weight`` and ``lambda_U`` =
``--undesirable-weight`` (the paper suggests ``lambda_D n_D / (lambda_U n_U)`` between 1 and
4/3 for ``n_D`` desirable and ``n_U`` undesirable rows). The loss is summed over completions;
the engine divides by the completions of the whole optimizer step.

**The reference point.** ``z_ref`` estimates KL(pi || ref) as in the paper and TRL: each
micro-batch also carries mismatched pairs, prompt ``i`` followed by the completion of row
``i - 1`` (cyclically, within the micro-batch), scored by the policy and the reference without
gradient. ``z_ref = max(0, mean over those pairs of r(x_i, y_{i-1}))``, the mean taken over
every data-parallel rank's pairs of the micro-batch (a sum and a count reduced with the
strategy), so all ranks use the same baseline; it is a constant of the loss. Differences from
TRL: TRL averages the ranks' means, this is the mean over all pairs (the same when ranks hold
equal counts); and a micro-batch of one completion has no mismatched pair, so it adds nothing
to the estimate (on one process, ``z_ref`` is then 0). ``--batch-size 1`` is refused for that
reason. The zero-weight filler micro-batch a rank runs when its share of a step has run out is
one row: unpacked it holds one completion and adds nothing, but a packed filler row adds its
pairs to that micro-batch's estimate.

The KL pairs cost a forward pass of the policy and one of the reference on top of the two the
completions need; their tokens are not counted in ``num_tokens``. They are laid out in the same
rows as the completions, so a packed row of them may run a little past ``--max-length``.

**Metrics.** The engine divides every metric by the step's completions (over all ranks), so
each is logged as a sum whose per-completion value means something:

- ``kl``: ``z_ref``, averaged over the step's micro-batches weighted by their completions
- ``count/chosen``, ``count/rejected``: the share of the step's completions that are desirable
  (undesirable)
- ``rewards/chosen_sum``, ``rewards/rejected_sum``: the implicit rewards ``beta * r(x, y)`` of
  desirable (undesirable) completions, summed, per completion of the step; the mean reward of
  a class is ``rewards/chosen_sum / count/chosen`` (TRL logs that quotient as
  ``rewards/chosen``). The difference of the two class means is the nearest thing to a margin;
  there is no ``rewards/margins`` or ``rewards/accuracies``, which need pairs.
- ``logps/chosen_sum``, ``logps/rejected_sum``: the policy's summed log-probabilities of the
  completions, the same way (divide by ``count/...`` for the class mean)
- ``rewards/agreement``: the share of completions on their label's side of the reference point
  (``r > z_ref`` for a desirable one, ``r < z_ref`` for an undesirable one), so whose loss is
  below half its weight
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from tunesmith import (
    IGNORE_INDEX,
    UNPAIRED_PREFERENCE_FORMATS,
    ConfigError,
    Example,
    LossOutput,
    Sample,
    Trainer,
    collate_causal,
    sequence_logps,
    tokenize_prompt_and_responses,
)

#: the batch keys of the mismatched (KL) sequences, each the ``collate_causal`` key after ``kl_``
KL_KEYS = ("input_ids", "position_ids", "targets", "sample_ids")


@dataclass
class LabelledCompletion:
    """One prompt (rendered once with the chat template), one completion after it, and whether it is desirable."""

    prompt_ids: list[int]
    completion_ids: list[int]
    desirable: bool
    columns: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)

    def sequence(self) -> Sample:
        return completion_sample(self.prompt_ids, self.completion_ids, self.columns)


def completion_sample(prompt_ids: list[int], completion_ids: list[int], columns: dict[str, Any] | None = None) -> Sample:
    """The prompt followed by the completion, labelled on the completion only."""
    return Sample(prompt_ids + completion_ids, [IGNORE_INDEX] * len(prompt_ids) + completion_ids, dict(columns or {}))


def truncate_completion(prompt_ids: list[int], completion_ids: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """Cut a prompt and completion to ``max_length`` tokens together.

    The prompt loses its start first (its end, next to the completion, matters most), down to
    half of ``max_length``; then the completion loses its end.
    """
    if len(prompt_ids) + len(completion_ids) <= max_length:
        return prompt_ids, completion_ids
    prompt_kept = min(len(prompt_ids), max(max_length - len(completion_ids), max_length // 2))
    return prompt_ids[len(prompt_ids) - prompt_kept :], completion_ids[: max_length - prompt_kept]


def kto_losses(
    logratios: torch.Tensor,
    desirable: torch.Tensor,
    kl: torch.Tensor | float,
    beta: float,
    desirable_weight: float,
    undesirable_weight: float,
) -> torch.Tensor:
    """Each completion's KTO loss from its ``logratios`` (policy minus reference log-probability), label and the reference point ``kl``."""
    signed = torch.where(desirable, logratios - kl, kl - logratios)
    weights = torch.where(desirable, desirable_weight, undesirable_weight).to(logratios.dtype)
    return weights * (1 - torch.sigmoid(beta * signed))


class KTOTrainer(Trainer):
    row_formats = UNPAIRED_PREFERENCE_FORMATS

    def setup(self, context):
        super().setup(context)
        batch_size = getattr(self.config, "batch_size", None)
        if batch_size is not None and batch_size < 2:
            raise ConfigError(
                "kto needs --batch-size 2 or more: the KL reference point is estimated from each micro-batch's "
                "prompts paired with other rows' completions, and a batch of one has no other row"
            )
        self.reference = context.make_reference(self.options["ref_model"] or None)

    # -- data units ----------------------------------------------------------------------------
    def prepare(self, example: Example) -> LabelledCompletion:
        fields = example.fields
        prompt_ids, (completion_ids,) = tokenize_prompt_and_responses(self.tokenizer, fields["prompt"], [fields["completion"]])
        return LabelledCompletion(prompt_ids, completion_ids, bool(fields["label"]), dict(example.columns))

    def truncate(self, unit: LabelledCompletion, max_length: int) -> LabelledCompletion:
        prompt_ids, completion_ids = truncate_completion(unit.prompt_ids, unit.completion_ids, max_length)
        return LabelledCompletion(prompt_ids, completion_ids, unit.desirable, unit.columns)

    def has_targets(self, unit: LabelledCompletion) -> bool:
        return bool(unit.completion_ids) and unit.sequence().num_trained_tokens > 0

    # -- batches -------------------------------------------------------------------------------
    def collate(self, rows: list[list[LabelledCompletion]]) -> dict[str, Any]:
        """The completions as a causal batch (numbered in row order), plus the mismatched KL sequences as ``kl_*``.

        The KL sequence of completion ``i`` is its prompt followed by completion ``i - 1``'s
        tokens (cyclically), cut to ``--max-length`` like a unit, laid out in the same rows. A
        batch of one completion has no mismatched pair: its KL sequence is its own and
        ``kl_weight`` is 0, so that every rank still runs the same forward passes.
        """
        units = [unit for row in rows for unit in row]
        count = len(units)
        batch = collate_causal([[unit.sequence() for unit in row] for row in rows], self.tokenizer.pad_token_id)
        max_length = getattr(self.config, "max_length", None)
        kl_rows, index = [], 0
        for row in rows:
            kl_row = []
            for unit in row:
                prompt_ids, completion_ids = unit.prompt_ids, units[(index - 1) % count].completion_ids
                if max_length:
                    prompt_ids, completion_ids = truncate_completion(prompt_ids, completion_ids, max_length)
                kl_row.append(completion_sample(prompt_ids, completion_ids))
                index += 1
            kl_rows.append(kl_row)
        kl_batch = collate_causal(kl_rows, self.tokenizer.pad_token_id)
        batch.update({f"kl_{key}": kl_batch[key] for key in KL_KEYS})
        batch.update(
            desirable=torch.tensor([unit.desirable for unit in units], dtype=torch.bool),
            num_completions=count,
            kl_weight=1.0 if count > 1 else 0.0,
        )
        return batch

    def count_items(self, batch: dict[str, Any]) -> int:
        return int(batch["num_completions"])

    # -- the loss ------------------------------------------------------------------------------
    def kl_reference_point(self, model, batch: dict[str, Any]) -> torch.Tensor:
        """``z_ref``: the mean policy-minus-reference log-ratio of the mismatched pairs over every rank, at least 0; no gradient."""
        count = batch["num_completions"]
        kl_batch = {key: batch[f"kl_{key}"] for key in KL_KEYS}
        with torch.no_grad():
            policy_logps, _ = sequence_logps(model, kl_batch, count)
        with self.reference(model) as reference:
            reference_logps, _ = sequence_logps(reference, kl_batch, count)
        weight = batch["kl_weight"]
        local = torch.stack([(policy_logps - reference_logps).sum() * weight, torch.tensor(float(count) * weight, device=policy_logps.device)])
        total, pairs = self.context.strategy.reduce(local.float().detach()).tolist()
        return torch.tensor(max(0.0, total / pairs) if pairs > 0 else 0.0, device=policy_logps.device)

    def compute_loss(self, model, batch: dict[str, Any]) -> LossOutput:
        count = batch["num_completions"]
        kl = self.kl_reference_point(model, batch)
        logps, _ = sequence_logps(model, batch, count)
        with self.reference(model) as reference:
            reference_logps, _ = sequence_logps(reference, batch, count)
        logratios = logps - reference_logps
        desirable = batch["desirable"].to(logratios.device)
        beta = self.options["beta"]
        losses = kto_losses(logratios, desirable, kl, beta, self.options["desirable_weight"], self.options["undesirable_weight"])
        rewards = beta * logratios.detach()
        undesirable = ~desirable
        agrees = torch.where(desirable, logratios.detach() > kl, logratios.detach() < kl)
        return LossOutput(losses.sum(), {
            "kl": float(kl) * count,
            "count/chosen": float(desirable.sum()),
            "count/rejected": float(undesirable.sum()),
            "rewards/chosen_sum": float(rewards[desirable].sum()),
            "rewards/rejected_sum": float(rewards[undesirable].sum()),
            "logps/chosen_sum": float(logps.detach()[desirable].sum()),
            "logps/rejected_sum": float(logps.detach()[undesirable].sum()),
            "rewards/agreement": float(agrees.sum()),
        })
