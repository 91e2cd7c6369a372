"""The ``accuracy`` reward and how it reads and compares answers. Run here with
``pytest plugins/rewards/tests`` (no install needed) or from the tunesmith repo's suite, which
collects these through tests/test_rewards_plugin.py."""

import threading

import pytest

from tunesmith_rewards.accuracy import accuracy_reward
from tunesmith_rewards.answers import answers_match, final_answer, reference_answer


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<think>2+2</think><answer> 4 </answer>", "4"),
        ("<answer>3</answer> wait, <answer>5</answer>", "5"),
        (r"so the result is \boxed{\frac{1}{2}}.", r"\frac{1}{2}"),
        (r"\boxed{1} no, \boxed{\frac{\sqrt{2}}{2}}", r"\frac{\sqrt{2}}{2}"),
        (r"<answer>It is \boxed{7}</answer>", "7"),
        ("Natalia sold 48/2 = 24 clips in May.\n#### 72", "72"),
        (r"The area is $\pi r^2$, so $12\pi$ here.", r"12\pi"),
        ("She has 3 apples, then 5 more: 8 in all", "8"),
        ("  Paris ", "Paris"),
    ],
)
def test_final_answer(text, expected):
    assert final_answer(text) == expected


def test_a_reference_is_all_of_its_text_unless_it_marks_an_answer():
    assert reference_answer(r" \frac{1}{2} ") == r"\frac{1}{2}"  # not its last number, 2
    assert reference_answer("She sold 24 in May and 48 in all.\n#### 72") == "72"


@pytest.mark.parametrize(
    ("predicted", "expected", "match"),
    [
        ("42.0", "42", True),
        ("1,234", "1234", True),
        (r"\frac{1}{2}", "0.5", True),
        (r"\frac12", r"\frac{1}{2}", True),
        (r"\dfrac{1}{2}", "1/2", True),
        (r"\frac{\sqrt{2}}{2}", r"\frac{1}{\sqrt{2}}", True),
        ("x+1", "1+x", True),
        ("paris.", "Paris", True),
        ("2", r"\frac{1}{2}", False),
        (r"\frac{1}{3}", "0.33", False),
        ("41", "42", False),
        ("Lyon", "Paris", False),
    ],
)
def test_answers_match_as_text_or_as_mathematics(predicted, expected, match):
    assert answers_match(predicted, expected) is match


def test_accuracy_compares_final_answers():
    completions = [
        "<think>6*7</think><answer>42</answer>",
        "<answer>42.0</answer>",
        "The total is 1,234 apples",
        "<answer>41</answer>",
        "<answer>paris.</answer>",
        "<answer>1/2</answer>",
        r"Halving gives \boxed{\frac12}.",
        "no idea",
    ]
    answer = ["42", "#### 42", "1234", "42", "Paris", "0.5", "0.5", "7"]
    assert accuracy_reward(["q"] * 8, completions, answer=answer) == [1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0]


def test_accuracy_is_none_for_a_row_without_a_reference():
    assert accuracy_reward(["q"] * 3, ["<answer>1</answer>", "2", "3"], answer=[None, "2", " "], level=[1, 2, 3]) == [None, 1.0, None]


def test_accuracy_takes_a_numeric_answer_column():
    assert accuracy_reward(["q", "q"], ["#### 72", "<answer>0.25</answer>"], answer=[72, 0.25]) == [1.0, 1.0]


def test_accuracy_reads_conversational_completions():
    completions = [[{"role": "assistant", "content": "<answer>9</answer>"}]]
    assert accuracy_reward(["q"], completions, answer=["9"]) == [1.0]


def test_accuracy_runs_off_the_main_thread():
    """Where tunesmith runs it: math-verify's own timeout (SIGALRM) works on the main thread only."""
    results = []
    thread = threading.Thread(target=lambda: results.append(accuracy_reward(["q"], [r"\boxed{\frac12}"], answer=["0.5"])))
    thread.start()
    thread.join(30)
    assert results == [[1.0]]
