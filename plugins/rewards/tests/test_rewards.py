"""Values of the reward functions. Run here with ``pytest plugins/rewards/tests`` (no install
needed) or from the tunesmith repo's suite, which collects these through tests/test_rewards_plugin.py."""

import pytest

from tunesmith_rewards.rewards import (
    DEFAULT_TARGET_LENGTH,
    accuracy_reward,
    final_answer,
    format_reward,
    length_reward,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<think>2+2</think><answer> 4 </answer>", "4"),
        ("<answer>3</answer> wait, <answer>5</answer>", "5"),
        (r"so the result is \boxed{\frac{1}{2}}.", r"\frac{1}{2}"),
        ("Natalia sold 48/2 = 24 clips in May.\n#### 72", "72"),
        ("  Paris ", "Paris"),
    ],
)
def test_final_answer(text, expected):
    assert final_answer(text) == expected


def test_accuracy_compares_final_answers():
    completions = [
        "<think>6*7</think><answer>42</answer>",
        "<answer>42.0</answer>",
        "The total is 1,234 apples",
        "<answer>41</answer>",
        "<answer>paris.</answer>",
        "<answer>1/2</answer>",
        "no idea",
    ]
    answer = ["42", "#### 42", "1234", "42", "Paris", "0.5", "7"]
    assert accuracy_reward(["q"] * 7, completions, answer=answer) == [1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.0]


def test_accuracy_is_none_without_a_reference():
    assert accuracy_reward(["q", "q"], ["<answer>1</answer>", "2"]) == [None, None]
    assert accuracy_reward(["q", "q"], ["<answer>1</answer>", "2"], answer=[None, "2"], level=[1, 2]) == [None, 1.0]


def test_accuracy_reads_conversational_completions():
    completions = [[{"role": "assistant", "content": "<answer>9</answer>"}]]
    assert accuracy_reward(["q"], completions, answer=["9"]) == [1.0]


def test_format_wants_think_then_answer():
    completions = [
        "<think>\nsteps\n</think>\n<answer>4</answer>\n",
        "<answer>4</answer>",
        "<think>steps</think> the answer is 4",
        "preamble <think>steps</think><answer>4</answer>",
    ]
    assert format_reward(["q"] * 4, completions) == [1.0, 0.0, 0.0, 0.0]


def test_length_is_a_soft_penalty_toward_the_target():
    completions = ["x" * 10, "x" * 15, "x" * 5, "x" * 40, ""]
    assert length_reward(["q"] * 5, completions, target_length=[10] * 5) == [0.0, -0.5, -0.5, -1.0, -1.0]
    assert length_reward(["q"], ["x" * (DEFAULT_TARGET_LENGTH // 2)]) == [-0.5]
