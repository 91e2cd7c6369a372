"""What a reward reads from a completion: its text, and its length in words.

A completion is a string, or for conversational prompts a list of messages whose last one is
the reply being judged.
"""

from __future__ import annotations


def completion_text(completion) -> str:
    """The completion's text: the string itself, or the last message's content."""
    if isinstance(completion, str):
        return completion
    return completion[-1]["content"]


def completion_length(completion) -> int:
    """The completion's length in words: its whitespace-separated pieces.

    Rewards run without the tokenizer, so lengths are counted in words; for English prose a
    word is about 1.3 tokens of a typical tokenizer, and text without spaces (code, formulas)
    counts as few words, so set a length-based reward's limits with your data in mind.
    """
    return len(completion_text(completion).split())
