"""Plain reward functions: ``fn(prompts, completions, **columns) -> list[float | None]``.

``completions`` holds one entry per generated completion: a string, or for conversational
datasets a list of messages whose last one is the reply. ``columns`` are the dataset's other
columns, each a list aligned with ``completions``. A reward returns ``None`` for a completion it
cannot judge (no reference answer), which the trainer leaves out rather than scoring as 0.
"""

from __future__ import annotations

import re
from fractions import Fraction

ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
BOXED = re.compile(r"\\boxed\{((?:[^{}]|\{[^{}]*\})*)\}")  # one level of nested braces: \boxed{\frac{1}{2}}
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?")
THINK_THEN_ANSWER = re.compile(r"^\s*<think>.*?</think>\s*<answer>.*?</answer>\s*$", re.DOTALL)

#: the ``length`` reward's target in characters, when the dataset has no ``target_length`` column
DEFAULT_TARGET_LENGTH = 400


def completion_text(completion) -> str:
    if isinstance(completion, str):
        return completion
    return completion[-1]["content"]


def final_answer(text: str) -> str:
    """The answer a text commits to: the last ``<answer>...</answer>``, else the last
    ``\\boxed{...}``, else what follows the last ``####`` (GSM8K), else the whole text."""
    for pattern in (ANSWER_TAG, BOXED):
        found = pattern.findall(text)
        if found:
            return found[-1].strip()
    if "####" in text:
        return text.rsplit("####", 1)[1].strip()
    return text.strip()


def _normalize(answer: str) -> str:
    return " ".join(answer.strip().strip("$").strip().rstrip(".").split()).casefold()


def _as_number(text: str) -> Fraction | None:
    try:
        return Fraction(text.replace(",", "").strip())
    except (ValueError, ZeroDivisionError):
        return None


def answers_match(completion: str, reference: str) -> bool:
    """Whether the completion's final answer is the reference's. A numeric reference matches the
    last number of the answer, by value (``42.0``, ``1,234``, ``1/2``); anything else must be equal
    as text, ignoring case, surrounding ``$``, a final period and runs of whitespace."""
    predicted, expected = _normalize(final_answer(completion)), _normalize(final_answer(reference))
    expected_number = _as_number(expected)
    if expected_number is None:
        return predicted == expected
    numbers = NUMBER.findall(predicted)
    return bool(numbers) and _as_number(numbers[-1]) == expected_number


def accuracy_reward(prompts, completions, answer=None, **columns) -> list[float | None]:
    """1.0 when the completion's final answer equals the ``answer`` column, else 0.0; ``None``
    for every completion when the dataset has no ``answer`` column, and where a row's is empty."""
    if answer is None:
        return [None] * len(completions)
    return [
        None if reference is None else float(answers_match(completion_text(completion), str(reference)))
        for completion, reference in zip(completions, answer, strict=True)
    ]


def format_reward(prompts, completions, **columns) -> list[float]:
    """1.0 when the completion is exactly ``<think>...</think>`` then ``<answer>...</answer>``, else 0.0."""
    return [float(THINK_THEN_ANSWER.match(completion_text(c)) is not None) for c in completions]


def length_reward(prompts, completions, target_length=None, **columns) -> list[float]:
    """A soft penalty toward a target length in characters: 0.0 on target, falling linearly with
    the relative distance, never below -1.0. The target is the ``target_length`` column where the
    dataset has one, else :data:`DEFAULT_TARGET_LENGTH`."""
    targets = target_length if target_length is not None else [DEFAULT_TARGET_LENGTH] * len(completions)
    rewards = []
    for completion, target in zip(completions, targets, strict=True):
        distance = abs(len(completion_text(completion)) - target) / target
        rewards.append(max(-1.0, -distance))
    return rewards
