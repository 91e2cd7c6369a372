"""The ``repetition`` reward: a penalty for repeating the same n-grams (runs of ``ngram_size`` words).

The value is ``max_penalty`` times the share of the completion's n-grams that repeat an earlier
one: 0.0 when none repeats, down to ``max_penalty`` (default -1.0) as all but one do. Words are
compared ignoring case; a completion shorter than one n-gram gets 0.0.
"""

from __future__ import annotations

from typing import Callable

from tunesmith_rewards.completions import completion_text

DEFAULT_NGRAM_SIZE = 3
DEFAULT_MAX_PENALTY = -1.0


def repeated_share(text: str, ngram_size: int) -> float:
    """The share of the text's n-grams that repeat an earlier one, from 0.0 up to (almost) 1.0."""
    words = text.casefold().split()
    ngrams = [tuple(words[start : start + ngram_size]) for start in range(len(words) - ngram_size + 1)]
    if not ngrams:
        return 0.0
    return 1.0 - len(set(ngrams)) / len(ngrams)


def make_repetition_reward(ngram_size: int = DEFAULT_NGRAM_SIZE, max_penalty: float = DEFAULT_MAX_PENALTY) -> Callable:
    """A repetition reward counting n-grams of ``ngram_size`` words, reaching ``max_penalty`` (at most 0)."""
    if ngram_size < 1:
        raise ValueError(f"ngram_size {ngram_size}: expected a number of words of at least 1")
    if max_penalty > 0:
        raise ValueError(f"max_penalty {max_penalty}: expected a penalty of 0 or below")

    def repetition_reward(prompts, completions, **columns) -> list[float]:
        shares = [repeated_share(completion_text(c), ngram_size) for c in completions]
        return [max_penalty * share if share else 0.0 for share in shares]

    return repetition_reward


repetition_reward = make_repetition_reward()
