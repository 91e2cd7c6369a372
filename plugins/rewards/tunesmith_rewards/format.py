"""The ``format`` reward: does the completion have the required shape?

By default the shape is reasoning in ``<think>...</think>`` followed by the answer in
``<answer>...</answer>``. A dataset column ``format_pattern`` sets a row's own pattern, and
:func:`make_format_reward` makes a reward with another default, for ``--reward module:function``::

    # my_rewards.py
    from tunesmith_rewards import make_format_reward

    boxed = make_format_reward(r".*\\\\boxed\\{.+\\}\\s*")

    # tunesmith grpo ... --reward my_rewards:boxed

The whole completion must match the pattern (``re.fullmatch``, with ``.`` matching newlines).
"""

from __future__ import annotations

import re
from typing import Callable

from tunesmith_rewards.completions import completion_text

DEFAULT_FORMAT_PATTERN = r"\s*<think>.*?</think>\s*<answer>.*?</answer>\s*"


def _compiled(pattern: str, where: str) -> re.Pattern:
    try:
        return re.compile(pattern, re.DOTALL)
    except re.error as error:
        raise ValueError(f"{where} {pattern!r} is not a valid regular expression: {error}") from None


def make_format_reward(pattern: str = DEFAULT_FORMAT_PATTERN) -> Callable:
    """A reward giving 1.0 to a completion matching ``pattern`` as a whole, else 0.0. A row's
    ``format_pattern`` column, where present and not empty, replaces the pattern for that row."""
    default = _compiled(pattern, "the format pattern")

    def format_reward(prompts, completions, format_pattern=None, **columns) -> list[float]:
        patterns = format_pattern if format_pattern is not None else [None] * len(completions)
        rewards = []
        for completion, row_pattern in zip(completions, patterns, strict=True):
            compiled = _compiled(row_pattern, "the format_pattern column's") if row_pattern else default
            rewards.append(float(compiled.fullmatch(completion_text(completion)) is not None))
        return rewards

    format_reward.__doc__ = f"1.0 when the whole completion matches {pattern!r} (or its row's format_pattern), else 0.0."
    return format_reward


format_reward = make_format_reward()
