"""The ``cosine`` reward: correctness scaled by length, so that a model learns to be brief when it
is right and to keep thinking when it is wrong (Yeo et al. 2025, "Demystifying Long
Chain-of-Thought Reasoning in LLMs").

A correct answer earns ``correct_short`` at length 0, falling along half a cosine to
``correct_long`` at ``max_length`` words; a wrong one earns ``wrong_short`` at length 0, rising to
``wrong_long`` at ``max_length``. Beyond ``max_length`` the value stays at the long end.
Correctness is the ``accuracy`` reward's; a row without an ``answer`` is not scored (None).
Lengths are in words (:func:`tunesmith_rewards.completions.completion_length`).
"""

from __future__ import annotations

import math
from typing import Callable

from tunesmith_rewards.accuracy import is_correct
from tunesmith_rewards.completions import completion_length

DEFAULT_MAX_LENGTH = 1000


def cosine_schedule(length: int, max_length: int, at_zero: float, at_max: float) -> float:
    """From ``at_zero`` at length 0 to ``at_max`` at ``max_length`` along half a cosine; flat after."""
    progress = min(length, max_length) / max_length
    return at_max + 0.5 * (at_zero - at_max) * (1.0 + math.cos(math.pi * progress))


def make_cosine_reward(
    max_length: int = DEFAULT_MAX_LENGTH,
    correct_short: float = 1.0,
    correct_long: float = 0.5,
    wrong_short: float = -1.0,
    wrong_long: float = -0.5,
) -> Callable:
    """A cosine reward with these values and length (in words); the registered ``cosine`` uses the defaults."""
    if max_length < 1:
        raise ValueError(f"max_length {max_length}: expected a length in words of at least 1")

    def cosine_reward(prompts, completions, answer, **columns) -> list[float | None]:
        rewards: list[float | None] = []
        for completion, reference in zip(completions, answer, strict=True):
            correct = is_correct(completion, reference)
            if correct is None:
                rewards.append(None)
                continue
            at_zero, at_max = (correct_short, correct_long) if correct else (wrong_short, wrong_long)
            rewards.append(cosine_schedule(completion_length(completion), max_length, at_zero, at_max))
        return rewards

    return cosine_reward


cosine_reward = make_cosine_reward()
