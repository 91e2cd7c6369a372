"""Labels cover exactly the assistant turns of the rendered chat template, whatever the data format.

Each assistant turn is trained from its first content token through the template's end-of-turn
token (``<|im_end|>``), which the model must learn to emit; the newline the template writes
after it, before the next turn, is not trained (generation stops at ``<|im_end|>``).
"""

from __future__ import annotations

import json
from itertools import groupby

import pytest
from transformers import AutoTokenizer

from tunesmith.data.loading import load_examples
from tunesmith.data.tokenize import CHATML_TEMPLATE, ensure_chat_template, render_chat, tokenize_chat
from tunesmith.data.types import IGNORE_INDEX, Sample
from tunesmith.errors import DataError
from tunesmith_trainers.pt import PretrainTrainer
from tunesmith_trainers.sft import SFTTrainer

END_OF_TURN = "<|im_end|>"


@pytest.fixture
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def trained_runs(tokenizer, sample: Sample) -> list[str]:
    """The text of each run of consecutive labelled tokens."""
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(sample.input_ids, sample.labels))
    runs = groupby(zip(sample.input_ids, sample.labels), key=lambda pair: pair[1] != IGNORE_INDEX)
    return [tokenizer.decode([token for token, _ in run]) for trained, run in runs if trained]


def prepare_row(tmp_path, tokenizer, row: dict, trainer_class=SFTTrainer):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(row) + "\n")
    (example,) = load_examples([str(path)], seed=0, skip_bad_rows=False).examples
    return example, trainer_class(tokenizer).prepare(example)


ROWS = {
    "messages": {
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "Blue."},
            {"role": "user", "content": "Another, with a line break?"},
            {"role": "assistant", "content": "Green,\nand red."},
        ]
    },
    "sharegpt": {
        "conversations": [
            {"from": "system", "value": "You are terse."},
            {"from": "human", "value": "Name a colour."},
            {"from": "gpt", "value": "Blue."},
            {"from": "human", "value": "Another, with a line break?"},
            {"from": "gpt", "value": "Green,\nand red."},
        ]
    },
    "alpaca": {"system": "You are terse.", "instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour."},
    "alpaca without system and input": {"instruction": "Name a prime number.", "output": "Seven."},
}

EXPECTED_MESSAGES = {
    "messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another, with a line break?"},
        {"role": "assistant", "content": "Green,\nand red."},
    ],
    "alpaca": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Translate to French.\nGood morning"},
        {"role": "assistant", "content": "Bonjour."},
    ],
    "alpaca without system and input": [
        {"role": "user", "content": "Name a prime number."},
        {"role": "assistant", "content": "Seven."},
    ],
}
EXPECTED_MESSAGES["sharegpt"] = EXPECTED_MESSAGES["messages"]


@pytest.mark.parametrize("data_format", list(ROWS))
def test_labels_cover_exactly_the_assistant_turns(tmp_path, tokenizer, data_format):
    example, sample = prepare_row(tmp_path, tokenizer, ROWS[data_format])
    assert example.messages == EXPECTED_MESSAGES[data_format]
    assistant_turns = [message["content"] for message in example.messages if message["role"] == "assistant"]
    assert trained_runs(tokenizer, sample) == [content + END_OF_TURN for content in assistant_turns]
    # Every token, trained or not, is the template's rendering of the whole conversation.
    assert tokenizer.decode(sample.input_ids) == tokenizer.apply_chat_template(example.messages, tokenize=False)


def test_assistant_spans_end_at_the_end_of_turn_token(tokenizer):
    messages = EXPECTED_MESSAGES["messages"]
    text, spans = render_chat(tokenizer, messages)
    assert [text[start:end] for start, end in spans] == ["Blue.<|im_end|>", "Green,\nand red.<|im_end|>"]
    assert text[spans[0][0] - len("<|im_start|>assistant\n") : spans[0][0]] == "<|im_start|>assistant\n"
    assert text[spans[-1][1] :] == "\n"


def test_a_tokenizer_without_a_chat_template_gets_chatml(tokenizer):
    tokenizer.chat_template = None
    ensure_chat_template(tokenizer)
    assert tokenizer.chat_template == CHATML_TEMPLATE
    messages = EXPECTED_MESSAGES["alpaca"]
    sample = tokenize_chat(tokenizer, messages)
    assert tokenizer.decode(sample.input_ids) == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nTranslate to French.\nGood morning<|im_end|>\n"
        "<|im_start|>assistant\nBonjour.<|im_end|>\n"
    )
    assert trained_runs(tokenizer, sample) == ["Bonjour.<|im_end|>"]


def test_an_existing_chat_template_is_kept(tokenizer):
    template = tokenizer.chat_template
    ensure_chat_template(tokenizer)
    assert tokenizer.chat_template == template


@pytest.mark.parametrize("trainer_class", [SFTTrainer, PretrainTrainer])
def test_text_rows_train_every_token_and_end_with_eos(tmp_path, tokenizer, trainer_class):
    _, sample = prepare_row(tmp_path, tokenizer, {"text": "The quick brown fox."}, trainer_class)
    assert sample.labels == sample.input_ids
    assert sample.input_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(sample.input_ids) == "The quick brown fox." + tokenizer.eos_token


def test_pretraining_on_a_conversation_trains_every_token(tmp_path, tokenizer):
    _, sample = prepare_row(tmp_path, tokenizer, ROWS["messages"], PretrainTrainer)
    assert sample.labels == sample.input_ids


def test_a_template_that_rewrites_earlier_turns_is_refused(tokenizer):
    # Renders only the last assistant turn in full, as templates that drop past reasoning do.
    tokenizer.chat_template = (
        "{% for message in messages %}{% if message['role'] == 'assistant' and not loop.last %}[elided]"
        "{% else %}{{ message['role'] + ': ' + message['content'] + '\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    with pytest.raises(DataError, match="prefix by prefix"):
        render_chat(tokenizer, EXPECTED_MESSAGES["messages"])


def test_sft_refuses_a_conversation_without_an_assistant_turn(tmp_path, tokenizer):
    with pytest.raises(DataError, match=r"data\.jsonl:1: .*no assistant message"):
        prepare_row(tmp_path, tokenizer, {"messages": [{"role": "user", "content": "Hello?"}]})
