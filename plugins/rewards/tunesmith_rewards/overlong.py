"""The ``soft_overlong`` reward: DAPO's soft punishment of completions that run too long
(Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning System at Scale").

A completion of up to ``max_length - cache`` words gets 0.0; over the last ``cache`` words
before ``max_length`` the value falls linearly to -1.0, and it stays -1.0 beyond. Set
``max_length`` near the longest completion generation allows, so that a completion is warned
before it is cut off. Lengths are in words (:func:`tunesmith_rewards.completions.completion_length`).
"""

from __future__ import annotations

from typing import Callable

from tunesmith_rewards.completions import completion_length

DEFAULT_MAX_LENGTH = 1000
DEFAULT_CACHE = 200


def overlong_penalty(length: int, max_length: int, cache: int) -> float:
    """0.0 up to ``max_length - cache``, then linearly down to -1.0 at ``max_length``, and -1.0 beyond."""
    excess = length - (max_length - cache)
    return -min(1.0, excess / cache) if excess > 0 else 0.0


def make_soft_overlong_reward(max_length: int = DEFAULT_MAX_LENGTH, cache: int = DEFAULT_CACHE) -> Callable:
    """A soft overlong reward for completions of at most ``max_length`` words, punished over the last ``cache``."""
    if not 0 < cache <= max_length:
        raise ValueError(f"cache {cache}: expected a number of words above 0 and at most max_length ({max_length})")

    def soft_overlong_reward(prompts, completions, **columns) -> list[float]:
        return [overlong_penalty(completion_length(c), max_length, cache) for c in completions]

    return soft_overlong_reward


soft_overlong_reward = make_soft_overlong_reward()
