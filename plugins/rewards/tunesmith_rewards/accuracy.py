"""The ``accuracy`` reward: is the completion's final answer the reference answer?"""

from __future__ import annotations

from tunesmith_rewards.answers import answers_match, final_answer, reference_answer
from tunesmith_rewards.completions import completion_text


def is_correct(completion, reference) -> bool | None:
    """Whether the completion's final answer is the reference's; None without a reference."""
    if reference is None or not str(reference).strip():
        return None
    return answers_match(final_answer(completion_text(completion)), reference_answer(str(reference)))


def accuracy_reward(prompts, completions, answer, **columns) -> list[float | None]:
    """1.0 when the completion's final answer equals the ``answer`` column's, else 0.0; None for a
    row whose answer is empty. See :mod:`tunesmith_rewards.answers` for how answers are read and compared."""
    results = [is_correct(completion, reference) for completion, reference in zip(completions, answer, strict=True)]
    return [None if correct is None else float(correct) for correct in results]
