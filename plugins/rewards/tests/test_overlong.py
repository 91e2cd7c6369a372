"""The ``soft_overlong`` reward: DAPO's overlong punishment, checked by hand and against TRL's."""

import pytest

from tunesmith_rewards.overlong import make_soft_overlong_reward, soft_overlong_reward


def test_free_up_to_the_cache_then_linear_to_minus_one():
    reward = make_soft_overlong_reward(max_length=100, cache=20)
    completions = [" ".join(["w"] * count) for count in (0, 80, 90, 95, 100, 130)]
    assert reward(["q"] * 6, completions) == pytest.approx([0.0, 0.0, -0.5, -0.75, -1.0, -1.0])
    assert soft_overlong_reward(["q", "q"], ["word " * 800, [{"role": "assistant", "content": "word " * 900}]]) == [0.0, -0.5]


def test_soft_overlong_matches_trls_on_words_as_tokens():
    trl_rewards = pytest.importorskip("trl.rewards")
    counts = [0, 1, 49, 50, 51, 63, 64, 65, 500]
    theirs = trl_rewards.get_soft_overlong_punishment(max_completion_len=64, soft_punish_cache=14)([[7] * n for n in counts])
    ours = make_soft_overlong_reward(max_length=64, cache=14)(["q"] * len(counts), [" ".join(["w"] * n) for n in counts])
    assert ours == pytest.approx(theirs)


def test_the_cache_must_fit_in_the_max_length():
    with pytest.raises(ValueError, match=r"cache 0: expected a number of words above 0 and at most max_length \(100\)"):
        make_soft_overlong_reward(max_length=100, cache=0)
