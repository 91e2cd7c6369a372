"""The ``length`` reward: a soft pull toward a target length in characters."""

from __future__ import annotations

from tunesmith_rewards.completions import completion_text

#: the target in characters, when the dataset has no ``target_length`` column
DEFAULT_TARGET_LENGTH = 400


def length_reward(prompts, completions, target_length=None, **columns) -> list[float]:
    """0.0 on target, falling linearly with the relative distance from it, never below -1.0. The
    target is the ``target_length`` column where the dataset has one, else :data:`DEFAULT_TARGET_LENGTH`."""
    targets = target_length if target_length is not None else [DEFAULT_TARGET_LENGTH] * len(completions)
    rewards = []
    for completion, target in zip(completions, targets, strict=True):
        distance = abs(len(completion_text(completion)) - target) / target
        rewards.append(max(-1.0, -distance))
    return rewards
