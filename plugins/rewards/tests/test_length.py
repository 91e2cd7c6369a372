"""The ``length`` reward, and the measures of a completion the rewards share."""

from tunesmith_rewards.completions import completion_length, completion_text
from tunesmith_rewards.length import DEFAULT_TARGET_LENGTH, length_reward


def test_length_is_a_soft_penalty_toward_the_target():
    completions = ["x" * 10, "x" * 15, "x" * 5, "x" * 40, ""]
    assert length_reward(["q"] * 5, completions, target_length=[10] * 5) == [0.0, -0.5, -0.5, -1.0, -1.0]
    assert length_reward(["q"], ["x" * (DEFAULT_TARGET_LENGTH // 2)]) == [-0.5]


def test_a_completion_is_its_text_or_its_last_messages_content_and_its_length_is_in_words():
    conversation = [{"role": "assistant", "content": "first"}, {"role": "assistant", "content": " two\n words "}]
    assert completion_text(conversation) == " two\n words "
    assert [completion_length(c) for c in ("", "one", "a  b\tc\nd", conversation)] == [0, 1, 4, 2]
