"""The reward both tools' GRPO runs score completions with in ``grpo_vs_trl.py``: one function,
imported by name (``--reward length_reward:length_reward`` in tunesmith, ``reward_funcs`` in TRL),
so both compute exactly the same thing at the same cost."""

from __future__ import annotations

#: the length in characters that scores 0
TARGET_CHARACTERS = 200


def length_reward(prompts, completions, **columns) -> list[float]:
    """Minus the relative distance of each completion's length from :data:`TARGET_CHARACTERS`,
    never below -1. A completion is a string, or a list of messages whose last one is the reply."""
    texts = [completion if isinstance(completion, str) else completion[-1]["content"] for completion in completions]
    return [max(-1.0, -abs(len(text) - TARGET_CHARACTERS) / TARGET_CHARACTERS) for text in texts]
