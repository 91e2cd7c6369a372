"""The ``cosine`` reward: correctness scaled by length, checked by hand and against TRL's."""

import pytest

from tunesmith_rewards.cosine import cosine_reward, make_cosine_reward


def words(count: int, answer: str) -> str:
    return " ".join(["step"] * (count - 1) + [rf"\boxed{{{answer}}}"])


def test_right_answers_gain_by_brevity_and_wrong_ones_lose_less_by_length():
    reward = make_cosine_reward(max_length=100)
    completions = [words(1, "4"), words(50, "4"), words(100, "4"), words(150, "4"), words(1, "5"), words(50, "5"), words(100, "5")]
    values = reward(["q"] * 7, completions, answer=["4"] * 7)
    # halfway the cosine is at its middle: 0.75 right, -0.75 wrong; at and past max_length it stays at the long end
    assert values[1:4] == pytest.approx([0.75, 0.5, 0.5])
    assert values[5:] == pytest.approx([-0.75, -0.5])
    assert 0.99 < values[0] <= 1.0 and -1.0 <= values[4] < -0.99


def test_cosine_is_none_without_a_reference():
    assert cosine_reward(["q", "q"], [r"\boxed{\frac12}", "x"], answer=["0.5", None]) == [pytest.approx(1.0, abs=1e-4), None]


def test_cosine_matches_trls():
    trl_rewards = pytest.importorskip("trl.rewards")
    completions = [words(count, answer) for count in (1, 7, 33, 64, 90, 200) for answer in (r"\frac{1}{3}", r"\frac12")]
    solutions = [r"\frac{1}{3}"] * len(completions)
    theirs = trl_rewards.get_cosine_scaled_reward(max_len=64)(
        [[{"role": "assistant", "content": c}] for c in completions], solutions, [[0] * len(c.split()) for c in completions]
    )
    assert make_cosine_reward(max_length=64)(["q"] * len(completions), completions, answer=solutions) == pytest.approx(theirs)
