"""Reading the final answer from a completion or a reference, and comparing two answers.

Answers are compared as text first (ignoring case, surrounding ``$``, a final period and runs
of whitespace), then as mathematics through math-verify, which parses LaTeX and plain
expressions with sympy: ``\\frac{1}{2}``, ``\\frac12``, ``1/2`` and ``0.5`` are one answer,
as are ``1,234`` and ``1234`` or ``x+1`` and ``1+x``.
"""

from __future__ import annotations

import logging
import re
import threading

ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
INLINE_MATH = re.compile(r"\$\$(.+?)\$\$|\$(.+?)\$|\\\((.+?)\\\)|\\\[(.+?)\\\]", re.DOTALL)
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?")

#: seconds math-verify may spend parsing or comparing one answer on the main thread
MATH_TIMEOUT = 5


class _TimeoutAdviceFilter(logging.Filter):
    """Drops math-verify's warning that, without its own timeout, the caller must bound the call:
    off the main thread tunesmith's reward runner does (``--reward-timeout``), so it would mislead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_TimeoutAdviceFilter())


def _last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}``, braces balanced to any depth."""
    starts = list(BOXED.finditer(text))
    if not starts:
        return None
    start, depth = starts[-1].end(), 1
    for index in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[index], 0)
        if depth == 0:
            return text[start:index]
    return None


def _marked_answer(text: str) -> str | None:
    """What the text marks as its answer: within the last ``<answer>...</answer>`` if any, the last
    ``\\boxed{...}``, else what follows the last ``####`` (GSM8K), else the tag's whole content."""
    tags = ANSWER_TAG.findall(text)
    if tags:
        text = tags[-1]
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    if "####" in text:
        return text.rsplit("####", 1)[1].strip()
    return text.strip() if tags else None


def final_answer(text: str) -> str:
    """The answer a completion commits to: what it marks (:func:`_marked_answer`), else its last
    inline formula (``$...$``, ``\\(...\\)``), else its last number, else its whole text."""
    marked = _marked_answer(text)
    if marked is not None:
        return marked
    formulas = INLINE_MATH.findall(text)
    if formulas:
        return next(part for part in formulas[-1] if part).strip()
    numbers = NUMBER.findall(text)
    return numbers[-1] if numbers else text.strip()


def reference_answer(text: str) -> str:
    """The answer a reference gives: what it marks (a GSM8K solution's ``#### 72``), else all of it."""
    marked = _marked_answer(text)
    return text.strip() if marked is None else marked


def _normalize(answer: str) -> str:
    return " ".join(answer.strip().strip("$").strip().rstrip(".").split()).casefold()


def _as_mathematics(answer: str, timeout: int | None) -> list:
    """math-verify's reading of an answer: as a formula first (so ``\\frac12`` parses), else as plain text."""
    from math_verify import parse  # with sympy, a second's import: not for every command that loads the plugins

    delimited = answer if INLINE_MATH.search(answer) else f"${answer}$"
    return parse(delimited, parsing_timeout=timeout) or parse(answer, parsing_timeout=timeout)


def answers_match(predicted: str, expected: str) -> bool:
    """Whether two final answers are the same, as text or as mathematics."""
    if _normalize(predicted) == _normalize(expected):
        return True
    # math-verify's timeouts use SIGALRM, which only the main thread may set; under tunesmith's
    # reward runner (a thread per reward) --reward-timeout bounds the call instead.
    timeout = MATH_TIMEOUT if threading.current_thread() is threading.main_thread() else None
    gold, guess = _as_mathematics(expected, timeout), _as_mathematics(predicted, timeout)
    from math_verify import verify

    return bool(gold and guess) and verify(gold, guess, timeout_seconds=timeout)
