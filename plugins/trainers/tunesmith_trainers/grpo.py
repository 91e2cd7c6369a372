"""Group Relative Policy Optimization (Shao et al., 2024): the policy samples a group of
completions per prompt, reward functions score them, and each completion is pushed up or down
by how much better it did than its group.

**Rollouts.** Each optimizer step's completions are made by the model itself
(:class:`~tunesmith_trainers.rollouts.RolloutSteps`): ``--num-generations`` completions per
prompt, scored by every ``--reward`` (weighted and summed), turned into advantages, then
trained on for ``--num-iterations`` steps. This module is the objective on those completions.

**The loss** of completion token ``t`` with advantage ``A`` (its sequence's), ``r`` the
probability ratio of the policy now to the policy that generated it
(``exp(logp - old_logp)``; 1 in value when ``--num-iterations`` is 1, where only its gradient
matters) and ``eps_low``/``eps_high`` = ``--epsilon``/``--epsilon-high``::

    loss_t = -min(r * A, clip(r, 1 - eps_low, 1 + eps_high) * A) + beta * kl_t
    kl_t   = exp(ref_t - logp_t) - (ref_t - logp_t) - 1      (the k3 estimator, beta = --beta)

With ``--kl-bias-correction`` (the default, as in TRL) ``kl_t`` is weighted by ``r``, which
makes its gradient the unbiased gradient of the reverse KL (DeepSeek-V3.2); the logged ``kl``
is the weighted estimate then, as TRL logs it.

Log-probabilities come from the logits divided by ``--temperature``, the distribution the
completions were sampled from. ``--loss-type`` says how token losses make the step's loss:

- ``grpo``: each completion's mean over its tokens, averaged over completions (the paper's)
- ``bnpo``: the mean over every token of a micro-batch, averaged over micro-batches
- ``dr_grpo``: the sum over tokens divided by ``--max-completion-length``, averaged over
  completions (Dr. GRPO: no length bias)
- ``dapo``: the mean over every completion token of the optimizer step, on every process
  (DAPO; the default, as in TRL)

**Metrics**, each over the step's completions: ``kl`` (the mean k3 estimate), ``entropy``
(of the sampling distribution), ``clip_ratio`` (tokens whose gradient the clipping removed),
weighted like the loss; and from the rollouts, the rewards and lengths (see ``rollouts.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from tunesmith import (
    IGNORE_INDEX,
    PROMPT_FORMATS,
    ConfigError,
    Example,
    LossOutput,
    Sample,
    TargetLogps,
    Trainer,
    collate_causal,
    load_rewards,
    target_logps,
    tokenize_prompt_and_responses,
)

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALE_REWARDS = ("group", "batch", "none")


@dataclass
class PromptUnit:
    """One prompt to complete: its tokens (rendered once with the chat template, ending in the
    assistant's turn opened), the prompt as the reward functions see it (the dataset's string,
    or its list of messages) and the row's other columns."""

    prompt_ids: list[int]
    prompt: Any
    conversational: bool
    where: str
    columns: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.prompt_ids)


@dataclass
class Rollout:
    """A scored completion of a prompt, trained on for ``--num-iterations`` steps.

    ``old_logps`` are the completion tokens' log-probabilities under the policy that generated
    it (kept when the policy moves before the completion's last update; else None), and
    ``ref_logps`` those under the reference model (with ``--beta`` above 0).
    """

    prompt_ids: list[int]
    completion_ids: list[int]
    advantage: float
    old_logps: list[float] | None = None
    ref_logps: list[float] | None = None

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str, eps: float = 1e-4) -> torch.Tensor:
    """Each completion's reward minus its group's mean, divided by the standard deviation
    (``scale`` ``group``: of its group; ``batch``: of every reward; ``none``: not divided) plus ``eps``.

    ``rewards`` is (N,), groups of ``group_size`` in a row; NaN marks a completion no reward
    could score: it is left out of means and deviations and its advantage is 0. A deviation
    needs two scored values (Bessel's correction), else the group's advantages are 0.
    """
    grouped = rewards.view(-1, group_size)
    advantages = (grouped - grouped.nanmean(dim=1, keepdim=True)).view(-1)
    if scale == "group":
        advantages = advantages / (_nanstd(grouped, dim=1).repeat_interleave(group_size) + eps)
    elif scale == "batch":
        advantages = advantages / (_nanstd(rewards, dim=0) + eps)
    return torch.nan_to_num(advantages, nan=0.0)


def _nanstd(values: torch.Tensor, dim: int) -> torch.Tensor:
    """The sample standard deviation ignoring NaN; NaN where fewer than two values are present."""
    present = (~values.isnan()).sum(dim=dim)
    deviations = (values - values.nanmean(dim=dim, keepdim=True)) ** 2
    variance = deviations.nansum(dim=dim) / (present - 1)
    return torch.where(present > 1, variance.sqrt(), torch.full_like(variance, float("nan")))


def clipped_token_losses(
    logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, eps_low: float, eps_high: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The clipped surrogate loss of each token, and whether clipping removed its gradient."""
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    losses = -torch.min(ratio * advantages, clipped * advantages)
    was_clipped = ((ratio < 1 - eps_low) & (advantages < 0)) | ((ratio > 1 + eps_high) & (advantages > 0))
    return losses, was_clipped


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Each token's k3 estimate of KL(policy || reference): ``exp(d) - d - 1`` with ``d = ref - logp``; never negative."""
    delta = ref_logps - logps
    return torch.exp(delta) - delta - 1


class GRPOTrainer(Trainer):
    row_formats = PROMPT_FORMATS

    def setup(self, context):
        super().setup(context)
        options, config = self.options, self.config
        if getattr(config, "packing", False):
            raise ConfigError("grpo trains on completions it generates, one per row: leave out --packing")
        if getattr(config, "eval_dataset", ()) or getattr(config, "val_split", 0.0):
            raise ConfigError("grpo has no evaluation on held-out data (it would need generation and rewards): leave out --eval-dataset and --val-split")
        if not options["reward"]:
            raise ConfigError("grpo needs at least one --reward NAME[:WEIGHT] to score completions (tunesmith plugins lists the installed rewards)")
        self.rewards = load_rewards(options["reward"], context.plugins, runtime=context.runtime)
        self.reference = context.make_reference(options["ref_model"] or None) if options["beta"] > 0 else None

    # -- data units ----------------------------------------------------------------------------
    def prepare(self, example: Example) -> PromptUnit:
        messages = example.fields["prompt"]
        prompt_ids, _ = tokenize_prompt_and_responses(self.tokenizer, messages, [])
        conversational = example.fields["conversational"]
        prompt = messages if conversational else messages[-1]["content"]
        return PromptUnit(prompt_ids, prompt, conversational, example.where, dict(example.columns))

    def truncate(self, unit: PromptUnit, max_length: int) -> PromptUnit:
        """A prompt longer than ``--max-length`` loses its start: its end leads into the completion."""
        return PromptUnit(unit.prompt_ids[-max_length:], unit.prompt, unit.conversational, unit.where, unit.columns)

    def has_targets(self, unit: PromptUnit) -> bool:
        return bool(unit.prompt_ids)

    def step_source(self, rows, plan):
        from tunesmith_trainers.rollouts import RolloutSteps

        return RolloutSteps(self, [row[0] for row in rows], plan)

    # -- batches -------------------------------------------------------------------------------
    def collate(self, rows: list[list[Rollout]]) -> dict[str, Any]:
        """The prompts and completions as a causal batch (targets on completion tokens), with
        each target position's old and reference log-probability and each completion's advantage."""
        rollouts = [rollout for row in rows for rollout in row]
        batch = collate_causal(
            [[Sample(r.prompt_ids + r.completion_ids, [IGNORE_INDEX] * len(r.prompt_ids) + r.completion_ids) for r in row] for row in rows],
            self.tokenizer.pad_token_id,
        )
        trained = batch["targets"] != IGNORE_INDEX
        for key in ("old_logps", "ref_logps"):
            if all(getattr(r, key) is not None for r in rollouts):
                # Target positions are in row order and, within a row, in sample order: the completions' tokens in turn.
                values = torch.zeros(trained.shape, dtype=torch.float32)
                values[trained] = torch.tensor([value for r in rollouts for value in getattr(r, key)], dtype=torch.float32)
                batch[key] = values
        batch["advantages"] = torch.tensor([r.advantage for r in rollouts], dtype=torch.float32)
        batch["num_completions"] = len(rollouts)
        batch["num_items"] = {"dapo": batch["num_target_tokens"], "bnpo": 1}.get(self.options["loss_type"], len(rollouts))
        return batch

    def count_items(self, batch: dict[str, Any]) -> int:
        return int(batch["num_items"])

    # -- the loss ------------------------------------------------------------------------------
    def token_logps(self, model, batch: dict[str, Any], entropy: bool = False) -> TargetLogps:
        """The completion tokens' log-probabilities at the sampling temperature, (T,) in target order."""
        return target_logps(model, batch, temperature=self.options["temperature"], entropy=entropy)

    def compute_loss(self, model, batch: dict[str, Any]) -> LossOutput:
        options = self.options
        scored = self.token_logps(model, batch, entropy=True)
        logps = scored.logps
        trained = batch["targets"] != IGNORE_INDEX
        owners = batch["sample_ids"][trained]
        device = logps.device
        old = batch["old_logps"].to(device)[trained] if "old_logps" in batch else logps.detach()
        advantages = batch["advantages"].to(device)[owners]
        eps_high = options["epsilon_high"] or options["epsilon"]
        losses, was_clipped = clipped_token_losses(logps, old, advantages, options["epsilon"], eps_high)
        metrics_per_token = {"clip_ratio": was_clipped.float()}
        if options["beta"] > 0:
            kl = k3_kl(logps, batch["ref_logps"].to(device)[trained])
            if options["kl_bias_correction"]:
                kl = kl * torch.exp(logps - old)
            losses = losses + options["beta"] * kl
            metrics_per_token["kl"] = kl.detach()
        metrics_per_token["entropy"] = scored.entropy

        count = batch["num_completions"]
        loss = self.aggregate(losses, owners, count, for_loss=True)
        metrics = {name: float(self.aggregate(values, owners, count, for_loss=False)) for name, values in metrics_per_token.items()}
        return LossOutput(loss, metrics)

    def aggregate(self, values: torch.Tensor, owners: torch.Tensor, count: int, for_loss: bool) -> torch.Tensor:
        """Token values summed so that the engine's division by :meth:`count_items` gives the loss type's mean.

        Metrics follow the loss, except that ``dr_grpo``'s are per-completion means (its
        division by a constant length is no mean of anything).
        """
        loss_type = self.options["loss_type"]
        if loss_type == "dapo":
            return values.sum()
        if loss_type == "bnpo":
            return values.sum() / max(values.numel(), 1)
        if loss_type == "dr_grpo" and for_loss:
            return values.sum() / self.options["max_completion_length"]
        sums = torch.zeros(count, dtype=values.dtype, device=values.device).index_add(0, owners, values)
        tokens = torch.zeros(count, dtype=values.dtype, device=values.device).index_add(0, owners, torch.ones_like(values))
        return (sums / tokens.clamp(min=1)).sum()
