"""Choosing rewards with ``--reward``, checking them against the data's columns, and running them
(tunesmith.rewards): concurrently, with a timeout, and with failures raised or skipped."""

from __future__ import annotations

import json
import math
import sys
import threading
import time

import pytest

from tests.helpers import write_jsonl
from tunesmith.errors import ConfigError, RewardError
from tunesmith.hooks import hookimpl
from tunesmith.plugins import create_plugin_manager
from tunesmith.records import RewardSpec
from tunesmith.rewards import (
    Reward,
    RewardResult,
    RewardRunner,
    _required_columns,
    check_reward_columns,
    load_rewards,
    parse_reward_option,
)


# -- parsing --reward ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("accuracy", ("accuracy", 1.0)),
        ("accuracy:0.5", ("accuracy", 0.5)),
        ("soft_overlong:-2", ("soft_overlong", -2.0)),
        ("format:1e-1", ("format", 0.1)),
        ("my_rewards:brevity", ("my_rewards:brevity", 1.0)),
        ("my_rewards:brevity:3", ("my_rewards:brevity", 3.0)),
        ("pkg.scoring:Scorer.score:.5", ("pkg.scoring:Scorer.score", 0.5)),
        ("maths:inf", ("maths:inf", 1.0)),  # a function called inf, not an infinite weight
        ("rm:runs/rm/final", ("rm:runs/rm/final", 1.0)),
        ("rm:runs/rm/final:0.25", ("rm:runs/rm/final", 0.25)),
        ("rm:C:/models/rm", ("rm:C:/models/rm", 1.0)),
        ("rm:runs/rm:2:1", ("rm:runs/rm:2", 1.0)),  # a path ending in :NUMBER is given with an explicit weight
    ],
)
def test_parse_reward_option(value, expected):
    assert parse_reward_option(value) == expected


@pytest.mark.parametrize("value", ["", "Accuracy", "accuracy:0.5x", "a:b:c", "my-rewards:fn", "mod:", ":1", "rm:", "rm::2", "acc:1e999"])
def test_parse_reward_option_refuses_other_shapes(value):
    with pytest.raises(ConfigError, match=rf"--reward {value}: ") as raised:
        parse_reward_option(value)
    if value not in ("rm:", "rm::2", "acc:1e999"):
        assert "NAME, NAME:WEIGHT, module:function, module:function:WEIGHT, rm:PATH or rm:PATH:WEIGHT" in str(raised.value)


# -- loading -------------------------------------------------------------------------------------
def keyword_reward(prompts, completions, keyword, **columns):
    return [float(word in completion) for completion, word in zip(completions, keyword)]


class RewardPlugin:
    @hookimpl
    def tunesmith_register_rewards(self):
        return [RewardSpec(name="has_keyword", fn=f"{__name__}:keyword_reward", description="1 when the keyword column is in the completion")]


@pytest.fixture
def manager():
    manager = create_plugin_manager()
    manager.register(RewardPlugin(), "test-rewards")
    return manager


def test_loads_a_registered_reward_with_its_weight_and_required_columns(manager):
    (reward,) = load_rewards(["has_keyword:0.5"], manager)
    assert (reward.name, reward.weight, reward.fn, reward.required_columns) == ("has_keyword", 0.5, keyword_reward, ("keyword",))


def test_an_unknown_reward_lists_the_installed_ones(manager):
    with pytest.raises(ConfigError, match=r"--reward acuracy: no reward named 'acuracy' is installed; installed rewards: has_keyword\."):
        load_rewards(["acuracy"], manager)


def test_a_reward_given_twice_is_refused(manager):
    with pytest.raises(ConfigError, match="has_keyword is given twice"):
        load_rewards(["has_keyword", "has_keyword:2"], manager)


def test_a_word_for_a_weight_is_read_as_a_function_with_a_hint(manager):
    with pytest.raises(ConfigError, match=r"no module named 'has_keyword' .* \(has_keyword is an installed reward; its weight is a number, as in has_keyword:0.5\)"):
        load_rewards(["has_keyword:heavy"], manager)


def test_loads_a_function_from_the_current_directory(manager, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "local_rewards_for_test.py").write_text(
        "def brevity(prompts, completions, limit, *, unit='chars', **columns):\n"
        "    return [1.0 if len(c) <= n else 0.0 for c, n in zip(completions, limit)]\n"
        "not_a_function = 3\n"
        "def no_completions(prompts):\n"
        "    return []\n"
    )
    (reward,) = load_rewards(["local_rewards_for_test:brevity:2"], manager)
    assert (reward.name, reward.weight, reward.required_columns) == ("local_rewards_for_test:brevity", 2.0, ("limit",))
    assert reward.fn(["q", "q"], ["short", "much too long"], limit=[5, 5]) == [1.0, 0.0]
    with pytest.raises(ConfigError, match=r"local_rewards_for_test \(.*local_rewards_for_test\.py\) has no 'missing'"):
        load_rewards(["local_rewards_for_test:missing"], manager)
    with pytest.raises(ConfigError, match="not_a_function in local_rewards_for_test is a int, not a function"):
        load_rewards(["local_rewards_for_test:not_a_function"], manager)
    with pytest.raises(ConfigError, match=r"takes \(prompts\); expected fn\(prompts, completions, \*\*columns\)"):
        load_rewards(["local_rewards_for_test:no_completions"], manager)
    with pytest.raises(ConfigError, match=rf"no module named 'no_such_rewards' in the current directory \({tmp_path}\)"):
        load_rewards(["no_such_rewards:fn"], manager)


def test_required_columns_are_keyword_parameters_without_a_default():
    def fn(prompts, completions, answer, level=1, *rest, tests, timeout=3, **columns):
        return []

    assert _required_columns(fn, "x") == ("answer", "tests")
    assert _required_columns(lambda prompts, completions, **columns: [], "x") == ()


def test_missing_columns_name_the_reward_the_columns_and_the_data():
    rewards = [Reward("accuracy", 1.0, None, ("answer",)), Reward("mine:fn", 1.0, None, ("tests", "language"))]
    check_reward_columns(rewards, ["prompt", "answer", "tests", "language"], "data.jsonl")
    with pytest.raises(ConfigError) as raised:
        check_reward_columns(rewards, ["prompt", "answer"], "data/train.jsonl")
    assert str(raised.value) == (
        "--reward mine:fn needs the columns 'tests', 'language', which data/train.jsonl does not have; its columns are answer, prompt"
    )


# -- a reward model trained by 'tunesmith rm' ------------------------------------------------------
@pytest.fixture(scope="module")
def reward_model_dir(tiny_model_dir, tmp_path_factory):
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = LlamaConfig.from_pretrained(tiny_model_dir, num_labels=1)
    torch.manual_seed(1)
    model = LlamaForSequenceClassification(config)
    path = tmp_path_factory.mktemp("tiny-rm")
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def test_a_reward_model_scores_prompt_and_completion_as_a_direct_forward_does(reward_model_dir, manager, tmp_path):
    import torch
    from transformers import AutoTokenizer

    from tunesmith.commands.score import score_file
    from tunesmith.runtime import select_runtime

    runtime = select_runtime(manager, "cpu", "fp32")
    (reward,) = load_rewards([f"rm:{reward_model_dir}:0.5"], manager, runtime=runtime)
    assert (reward.name, reward.weight, reward.required_columns) == (f"rm:{reward_model_dir}", 0.5, ())
    prompts = ["What is 2+2?", [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}], "Hi"]
    completions = ["It is 4.", [{"role": "assistant", "content": "Blue."}], "Hello there, how can I help you today?"]
    scores = reward.fn(prompts, completions, answer=["4", None, None])

    tokenizer, model = AutoTokenizer.from_pretrained(reward_model_dir), reward.fn.model
    expected = []
    for prompt, completion in zip(prompts, completions):
        messages = ([{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt) + (
            [{"role": "assistant", "content": completion}] if isinstance(completion, str) else completion
        )
        text = tokenizer.apply_chat_template(messages, tokenize=False).rstrip()
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            expected.append(model.score(model.model(input_ids=ids).last_hidden_state)[0, -1, 0].item())
    assert scores == pytest.approx(expected, rel=1e-4, abs=1e-5)

    rows = [{"prompt": p, "completion": c} for p, c in zip(prompts, completions)]
    score_file(model, reward.fn.tokenizer, runtime, write_jsonl(tmp_path / "rows.jsonl", rows), tmp_path / "scored.jsonl", 2, 2048)
    assert [json.loads(line)["score"] for line in (tmp_path / "scored.jsonl").read_text().splitlines()] == pytest.approx(scores, rel=1e-5)


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # raised inside peft
def test_a_lora_reward_models_folder_loads_on_the_base_its_adapter_names(reward_model_dir, manager, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, LlamaForSequenceClassification

    from tunesmith.runtime import select_runtime

    base = LlamaForSequenceClassification.from_pretrained(reward_model_dir, dtype=torch.float32)
    torch.manual_seed(2)
    lora = get_peft_model(base, LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).eval()
    lora.save_pretrained(tmp_path / "final")
    (reward,) = load_rewards([f"rm:{tmp_path / 'final'}"], manager, runtime=select_runtime(manager, "cpu", "fp32"))
    score = reward.fn(["What is 2+2?"], ["It is 4."])

    tokenizer = AutoTokenizer.from_pretrained(reward_model_dir)
    messages = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "It is 4."}]
    ids = torch.tensor([tokenizer(tokenizer.apply_chat_template(messages, tokenize=False).rstrip(), add_special_tokens=False)["input_ids"]])
    inner = lora.base_model.model
    with torch.no_grad():
        expected = inner.score(inner.model(input_ids=ids).last_hidden_state)[0, -1, 0].item()
    assert score == [pytest.approx(expected, rel=1e-4, abs=1e-5)]


def test_rm_refuses_what_is_not_a_reward_model(manager, tmp_path, tiny_model_dir):
    with pytest.raises(ConfigError, match=r"--reward rm:.*nowhere: .*nowhere is not a folder; expected a reward model"):
        load_rewards([f"rm:{tmp_path / 'nowhere'}"], manager)
    with pytest.raises(ConfigError, match=r"--reward rm:.*: .* holds neither a model \(config.json\) nor an adapter"):
        load_rewards([f"rm:{tmp_path}"], manager)
    with pytest.raises(ConfigError, match=rf"^--reward rm:{tiny_model_dir}: not a reward model \(its architectures are LlamaForCausalLM\); "
                       r"give the folder a 'tunesmith rm' run wrote \(OUTPUT/final\)$"):
        load_rewards([f"rm:{tiny_model_dir}"], manager)


# -- running -------------------------------------------------------------------------------------
def constant(value):
    def fn(prompts, completions, **columns):
        return [value] * len(completions)

    return fn


def run(runner, completions, **columns):
    rows = [f"data.jsonl:{index + 1}" for index in range(len(completions))]
    return runner(["q"] * len(completions), completions, columns, rows)


def test_totals_are_weighted_sums_over_the_rewards_that_scored():
    rewards = [Reward("a", 1.0, None, ()), Reward("b", 0.5, None, ()), Reward("c", -2.0, None, ())]
    result = RewardResult(
        values={"a": [1.0, None, None, 0.0], "b": [2.0, 4.0, None, None], "c": [0.5, None, None, 1.0]},
        seconds={}, timed_out={}, errors_skipped={},
    )
    assert result.totals(rewards) == [1.0, 2.0, None, -2.0]


def test_runs_each_reward_with_the_columns_it_accepts(tmp_path):
    def needs_answer(prompts, completions, answer):
        return [float(c == a) for c, a in zip(completions, answer)]

    rewards = [Reward("exact", 2.0, needs_answer, ("answer",)), Reward("nan", 1.0, constant(float("nan")), ())]
    result = run(RewardRunner(rewards, timeout=5), ["4", "5"], answer=["4", "4"], level=[1, 2])
    assert result.values == {"exact": [1.0, 0.0], "nan": [None, None]}
    assert result.totals(rewards) == [2.0, 0.0]
    assert result.timed_out == result.errors_skipped == {"exact": 0, "nan": 0}
    assert set(result.seconds) == {"exact", "nan"}


def test_rewards_run_concurrently():
    def sleepy(prompts, completions, **columns):
        time.sleep(0.5)
        return [1.0] * len(completions)

    rewards = [Reward("first", 1.0, sleepy, ()), Reward("second", 1.0, sleepy, ())]
    started = time.perf_counter()
    result = run(RewardRunner(rewards, timeout=None), ["x"])
    assert time.perf_counter() - started < 0.9
    assert result.totals(rewards) == [2.0]


def test_a_hung_reward_times_out_and_is_not_started_again_while_it_hangs():
    release, calls = threading.Event(), []

    def hangs(prompts, completions, **columns):
        calls.append(len(completions))
        release.wait(30)
        return [1.0] * len(completions)

    rewards = [Reward("hangs", 1.0, hangs, ()), Reward("quick", 1.0, constant(0.5), ())]
    runner = RewardRunner(rewards, timeout=0.3)
    try:
        started = time.perf_counter()
        result = run(runner, ["x", "y"])
        assert time.perf_counter() - started < 1.3
        assert result.values == {"hangs": [None, None], "quick": [0.5, 0.5]}
        assert result.timed_out == {"hangs": 2, "quick": 0}
        assert result.totals(rewards) == [0.5, 0.5]
        started = time.perf_counter()
        assert run(runner, ["z"]).timed_out == {"hangs": 1, "quick": 0}
        assert time.perf_counter() - started < 0.3
        assert calls == [2]
    finally:
        release.set()
    deadline = time.perf_counter() + 5
    result = run(runner, ["w"])
    while result.timed_out["hangs"] and time.perf_counter() < deadline:  # until the released call has returned
        time.sleep(0.01)
        result = run(runner, ["w"])
    assert result.values["hangs"] == [1.0]
    assert calls == [2, 1]


def fails_on_seven(prompts, completions, **columns):
    return [1.0 / (len(c) - 7) for c in completions]


def test_a_failing_reward_raises_naming_itself_and_its_first_failing_row():
    runner = RewardRunner([Reward("fragile", 1.0, fails_on_seven, ())], timeout=5)
    with pytest.raises(RewardError, match=r"reward fragile raised ZeroDivisionError\(.*\) on row data\.jsonl:2$"):
        run(runner, ["short", "7 chars", "another"])


def test_a_reward_failing_only_on_whole_batches_names_the_batch_rows():
    def batch_only(prompts, completions, **columns):
        if len(completions) > 1:
            raise RuntimeError("out of memory")
        return [1.0]

    runner = RewardRunner([Reward("batchy", 1.0, batch_only, ())], timeout=5)
    with pytest.raises(RewardError, match=r"reward batchy raised RuntimeError\('out of memory'\) on a batch of rows data.jsonl:1, data.jsonl:2$"):
        run(runner, ["a", "b"])


def test_a_failing_reward_whose_rows_outlast_the_timeout_names_the_batch_rows():
    release = threading.Event()

    def slow_rows(prompts, completions, **columns):
        if len(completions) > 1:
            raise RuntimeError("bad batch")
        release.wait(30)
        return [1.0]

    runner = RewardRunner([Reward("slow", 1.0, slow_rows, ())], timeout=0.3)
    started = time.perf_counter()
    try:
        with pytest.raises(RewardError, match=r"reward slow raised RuntimeError\('bad batch'\) on a batch of rows data.jsonl:1, data.jsonl:2$"):
            run(runner, ["a", "b"])
        assert time.perf_counter() - started < 1.3
    finally:
        release.set()


@pytest.mark.parametrize(
    ("returned", "message"),
    [
        ([1.0], r"reward bad returned 1 values for 2 completions \(rows data.jsonl:1, data.jsonl:2\)"),
        ("11", r"reward bad returned str, expected a list of 2 floats \(or None\)"),
        ([1.0, "high"], r"reward bad returned 'high' for row data.jsonl:2, expected a float or None"),
        ([math.inf, 1.0], r"reward bad returned inf for row data.jsonl:1, expected a finite number \(or None\)"),
    ],
)
def test_a_malformed_return_value_names_the_reward(returned, message):
    runner = RewardRunner([Reward("bad", 1.0, lambda prompts, completions, **columns: returned, ())], timeout=5)
    with pytest.raises(RewardError, match=message):
        run(runner, ["a", "b"])


def test_skip_leaves_a_failing_rewards_completions_unscored_and_counts_them(caplog):
    rewards = [Reward("fragile", 1.0, fails_on_seven, ()), Reward("steady", 0.5, constant(1.0), ())]
    runner = RewardRunner(rewards, timeout=5, errors="skip")
    result = run(runner, ["short", "7 chars", "another"])
    assert result.values == {"fragile": [None, None, None], "steady": [1.0, 1.0, 1.0]}
    assert result.errors_skipped == {"fragile": 3, "steady": 0}
    assert result.totals(rewards) == [0.5, 0.5, 0.5]
    assert "reward fragile raised ZeroDivisionError" in caplog.text
    assert run(runner, ["fine"]).values["fragile"] == [pytest.approx(-1 / 3)]


def test_runner_options_are_checked():
    with pytest.raises(ConfigError, match="--reward-errors ignore: expected one of raise, skip"):
        RewardRunner([], timeout=1, errors="ignore")
    with pytest.raises(ConfigError, match="--reward-timeout 0: expected a number of seconds above 0"):
        RewardRunner([], timeout=0)
