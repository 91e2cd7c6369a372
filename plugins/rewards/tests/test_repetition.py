"""The ``repetition`` reward: a penalty for repeated n-grams, checked by hand and against TRL's."""

import pytest

from tunesmith_rewards.repetition import make_repetition_reward, repetition_reward


def test_no_repetition_is_free_and_repeating_approaches_the_max_penalty():
    completions = ["the cat sat on the mat", "go go go go go", "a b", "", "Ha ha HA ha"]
    # 4 trigrams all distinct; 3 trigrams, 1 distinct; too short; empty; case is ignored: 2 trigrams, 1 distinct
    assert repetition_reward(["q"] * 5, completions) == pytest.approx([0.0, -2 / 3, 0.0, 0.0, -0.5])
    assert make_repetition_reward(ngram_size=1, max_penalty=-0.5)(["q"], ["x y x y"]) == [pytest.approx(-0.25)]


def test_repetition_matches_trls_on_words_as_tokens():
    trl_rewards = pytest.importorskip("trl.rewards")
    completions = ["one two three one two three one", "a b c d e f", "x x x x x x x x", "to be or not to be"]
    vocabulary: dict[str, int] = {}
    ids = [[vocabulary.setdefault(word, len(vocabulary)) for word in c.split()] for c in completions]
    for size in (1, 2, 3):
        theirs = trl_rewards.get_repetition_penalty_reward(ngram_size=size, max_penalty=-2.0)(ids)
        assert make_repetition_reward(size, -2.0)(["q"] * 4, completions) == pytest.approx(theirs)


def test_repetition_options_are_checked():
    with pytest.raises(ValueError, match="max_penalty 0.5: expected a penalty of 0 or below"):
        make_repetition_reward(max_penalty=0.5)
    with pytest.raises(ValueError, match="ngram_size 0"):
        make_repetition_reward(ngram_size=0)
