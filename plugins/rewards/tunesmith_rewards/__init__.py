"""Reward functions for tunesmith, each ``fn(prompts, completions, **columns) -> list[float | None]``.

The registered rewards (``accuracy``, ``format``, ``code``, ``cosine``, ``repetition``, ``soft_overlong``,
``length``) use their defaults; the ``make_*`` factories build variants for ``--reward module:function``.
"""

from tunesmith_rewards.accuracy import accuracy_reward
from tunesmith_rewards.answers import answers_match, final_answer, reference_answer
from tunesmith_rewards.completions import completion_length, completion_text
from tunesmith_rewards.cosine import cosine_reward, make_cosine_reward
from tunesmith_rewards.format import format_reward, make_format_reward
from tunesmith_rewards.length import length_reward
from tunesmith_rewards.overlong import make_soft_overlong_reward, soft_overlong_reward
from tunesmith_rewards.repetition import make_repetition_reward, repetition_reward

__all__ = [
    "accuracy_reward",
    "answers_match",
    "completion_length",
    "completion_text",
    "cosine_reward",
    "final_answer",
    "format_reward",
    "length_reward",
    "make_cosine_reward",
    "make_format_reward",
    "make_repetition_reward",
    "make_soft_overlong_reward",
    "reference_answer",
    "repetition_reward",
    "soft_overlong_reward",
]
