"""The ``format`` reward: the default shape, a row's own pattern, and a pattern of your own."""

import pytest

from tunesmith_rewards.format import format_reward, make_format_reward


def test_format_wants_think_then_answer():
    completions = [
        "<think>\nsteps\n</think>\n<answer>4</answer>\n",
        "<answer>4</answer>",
        "<think>steps</think> the answer is 4",
        "preamble <think>steps</think><answer>4</answer>",
        "<think>steps</think><answer>4</answer> and an afterthought",
        "<think>steps<answer>4</answer>",
        [{"role": "assistant", "content": "<think>s</think><answer>4</answer>"}],
    ]
    assert format_reward(["q"] * 7, completions) == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]


def test_a_rows_format_pattern_replaces_the_default_for_that_row():
    completions = ["Answer: 4", "Answer: 4", "<think>s</think><answer>4</answer>"]
    patterns = [r"Answer: \d+", r"\d+", None]
    assert format_reward(["q"] * 3, completions, format_pattern=patterns) == [1.0, 0.0, 1.0]


def test_make_format_reward():
    boxed = make_format_reward(r".*\\boxed\{.+\}\s*")
    assert boxed(["q"] * 3, ["so \\boxed{4}\n", "so 4", "\\boxed{4} is it"]) == [1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match=r"the format pattern '\(unclosed' is not a valid regular expression"):
        make_format_reward("(unclosed")
    with pytest.raises(ValueError, match=r"the format_pattern column's '\[' is not a valid regular expression"):
        format_reward(["q"], ["x"], format_pattern=["["])
