"""Reading every supported file format, sampling and mixing, and reporting bad data precisely."""

from __future__ import annotations

import csv
import json
import re

import pytest
from transformers import AutoTokenizer

from tunesmith.data.loading import load_examples, parse_spec, split_validation
from tunesmith.data.pipeline import prepare_samples
from tunesmith.data.readers import BadRowError, read_records
from tunesmith.data.types import Example
from tunesmith.errors import DataError
from tunesmith_trainers.sft import SFTTrainer

ALPACA_ROWS = [
    {"instruction": f"Question {index}?", "input": "", "output": f"Answer {index}.", "id": f"row-{index}"} for index in range(1, 6)
]


def conversation(index: int) -> dict:
    return {
        "messages": [{"role": "user", "content": f"Question {index}?"}, {"role": "assistant", "content": f"Answer {index}."}],
        "id": f"row-{index}",
    }


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_json(path, rows):
    path.write_text(json.dumps(rows, indent=2))
    return path


def write_csv(path, rows):
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_parquet(path, rows):
    import pyarrow
    import pyarrow.parquet

    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), path)
    return path


def write_saved_dataset(path, rows):
    import datasets

    datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


def write_saved_dataset_dict(path, rows):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(path))
    return path


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def load(path, **options):
    options.setdefault("seed", 0)
    options.setdefault("skip_bad_rows", False)
    return load_examples([str(path)], **options)


# --- file formats -------------------------------------------------------------------------------

FORMATS = {
    "data.jsonl": (write_jsonl, [conversation(index) for index in range(1, 6)]),
    "data.json": (write_json, [conversation(index) for index in range(1, 6)]),
    "data.csv": (write_csv, ALPACA_ROWS),
    "data.parquet": (write_parquet, [conversation(index) for index in range(1, 6)]),
    "saved": (write_saved_dataset, [conversation(index) for index in range(1, 6)]),
    "saved-dict": (write_saved_dataset_dict, ALPACA_ROWS),
}


@pytest.mark.parametrize("name", list(FORMATS))
def test_every_file_format_reads_into_examples(tmp_path, name):
    writer, rows = FORMATS[name]
    path = writer(tmp_path / name, rows)
    loaded = load(path)
    assert loaded.bad_rows == 0
    assert [example.messages for example in loaded.examples] == [
        [{"role": "user", "content": f"Question {index}?"}, {"role": "assistant", "content": f"Answer {index}."}]
        for index in range(1, 6)
    ]
    assert [example.columns for example in loaded.examples] == [{"id": f"row-{index}"} for index in range(1, 6)]
    assert {example.source for example in loaded.examples} == {str(path)}


def test_rows_are_numbered_by_line_in_jsonl_and_csv_and_by_row_elsewhere(tmp_path):
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text(json.dumps(conversation(1)) + "\n\n" + json.dumps(conversation(2)) + "\n")
    assert [number for number, _ in read_records(jsonl)] == [1, 3]

    table = tmp_path / "data.csv"
    table.write_text('instruction,output\n"two\nlines",a\nsecond,b\n')
    assert list(read_records(table)) == [(2, {"instruction": "two\nlines", "output": "a"}), (4, {"instruction": "second", "output": "b"})]

    listing = write_json(tmp_path / "data.json", [conversation(1), conversation(2)])
    assert [example.row for example in load(listing).examples] == [1, 2]


def test_a_json_file_holding_json_lines_is_read_as_json_lines(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(conversation(1)) + "\n" + json.dumps(conversation(2)) + "\n")
    assert [example.row for example in load(path).examples] == [1, 2]


@pytest.mark.parametrize(
    ("row", "data_format"),
    [
        ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}, "messages"),
        ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}, "sharegpt"),
        ({"instruction": "q", "output": "a"}, "alpaca"),
        ({"text": "plain"}, "text"),
    ],
)
def test_extra_columns_survive_into_examples_and_samples(tmp_path, tokenizer, row, data_format):
    extra = {"score": 0.5, "tags": ["a", "b"], "meta": {"source": "unit test"}}
    loaded = load(write_jsonl(tmp_path / "data.jsonl", [{**row, **extra}]))
    assert loaded.examples[0].columns == extra
    prepared = prepare_samples(SFTTrainer(tokenizer), loaded.examples, max_length=64, skip_bad_rows=False)
    assert prepared.samples[0].columns == extra


# --- sampling and mixing ------------------------------------------------------------------------


def test_sampling_n_rows_is_seeded_and_keeps_file_order(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [conversation(index) for index in range(1, 21)])
    rows = [example.row for example in load(f"{path}#5").examples]
    assert len(rows) == 5 == len(set(rows))
    assert rows == sorted(rows)
    assert rows == [example.row for example in load(f"{path}#5").examples]
    assert any(rows != [example.row for example in load(f"{path}#5", seed=seed).examples] for seed in range(1, 5))


def test_sampling_more_rows_than_the_file_has_repeats_rows(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [conversation(index) for index in range(1, 5)])
    rows = [example.row for example in load(f"{path}#10").examples]
    assert len(rows) == 10
    # Every row twice, and two more drawn without replacement.
    assert all(rows.count(row) in (2, 3) for row in range(1, 5))
    assert sum(rows.count(row) == 3 for row in range(1, 5)) == 2


def test_sampling_a_ratio_of_rows(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [conversation(index) for index in range(1, 21)])
    assert len(load(f"{path}#0.25").examples) == 5
    assert len(load(f"{path}#1.5").examples) == 30


def test_mixing_files_concatenates_them_in_order(tmp_path):
    chats = write_jsonl(tmp_path / "chats.jsonl", [conversation(index) for index in range(1, 4)])
    texts = write_jsonl(tmp_path / "texts.jsonl", [{"text": f"text {index}"} for index in range(1, 11)])
    loaded = load_examples([str(chats), f"{texts}#4"], seed=0, skip_bad_rows=False)
    assert [example.source for example in loaded.examples] == [str(chats)] * 3 + [str(texts)] * 4
    assert all(example.text is not None for example in loaded.examples[3:])


def test_specs(tmp_path):
    assert parse_spec("data.jsonl#12") == parse_spec("data.jsonl#12")
    assert (parse_spec("data.jsonl#12").path, parse_spec("data.jsonl#12").count) == ("data.jsonl", 12)
    assert (parse_spec("a#b.jsonl").path, parse_spec("a#b.jsonl").count) == ("a#b.jsonl", None)
    assert parse_spec("data.jsonl#.5").ratio == 0.5
    for bad in ("data.jsonl#0", "data.jsonl#0.0"):
        with pytest.raises(DataError, match=re.escape(bad)):
            parse_spec(bad)


def test_split_validation_holds_out_at_least_one_example():
    examples = [Example(source="data.jsonl", row=row, fields={"text": "t"}) for row in range(1, 11)]
    train, evaluation = split_validation(examples, fraction=0.01, seed=0)
    assert len(evaluation) == 1 and len(train) == 9
    assert sorted(example.row for example in train + evaluation) == list(range(1, 11))
    train, evaluation = split_validation(examples, fraction=0.3, seed=0)
    assert (len(train), len(evaluation)) == (7, 3)
    assert split_validation(examples, fraction=0.0, seed=0) == (examples, [])
    with pytest.raises(DataError, match="leaving none to train on"):
        split_validation(examples[:1], fraction=0.5, seed=0)


# --- bad data -----------------------------------------------------------------------------------

GOOD = json.dumps(conversation(1))

BAD_FILES = {
    "malformed JSON line": ([GOOD, '{"messages": [', GOOD], r"data\.jsonl:2: invalid JSON: expecting value at the end of the line$"),
    "raw tab in a JSON string": (
        [GOOD, '{"text": "a\tb"}', GOOD],
        r"data\.jsonl:2: invalid JSON: control character '\\t' at column 12; inside a string write it escaped, as \\t$",
    ),
    "unterminated JSON string": ([GOOD, '{"text": "ab', GOOD], r"data\.jsonl:2: invalid JSON: unterminated string starting at column 10$"),
    "non-object row": ([GOOD, "[1, 2]", GOOD], r"data\.jsonl:2: expected an object .*got a list"),
    "missing field": ([GOOD, json.dumps({"id": 3}), GOOD], r"data\.jsonl:2: messages: missing"),
    "unknown role": (
        [GOOD, json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]}), GOOD],
        r"data\.jsonl:2: messages\[1\]\.role: unknown role 'bot'; expected one of system, user, assistant",
    ),
    "missing content": (
        [GOOD, json.dumps({"messages": [{"role": "user"}]}), GOOD],
        r"data\.jsonl:2: messages\[0\]\.content: missing",
    ),
    "non-string content": (
        [GOOD, json.dumps({"messages": [{"role": "user", "content": ["q"]}]}), GOOD],
        r"data\.jsonl:2: messages\[0\]\.content: expected a string, got a list",
    ),
    "messages not a list": ([GOOD, json.dumps({"messages": "hi"}), GOOD], r"data\.jsonl:2: messages: expected a list of turns, got a string"),
    "unknown sharegpt speaker": (
        [
            json.dumps({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}),
            json.dumps({"conversations": [{"from": "robot", "value": "q"}]}),
            json.dumps({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}),
        ],
        r"data\.jsonl:2: conversations\[0\]\.from: unknown speaker 'robot'; expected one of human, user, gpt, assistant, system",
    ),
    "alpaca output not a string": (
        [json.dumps({"instruction": "q", "output": output}) for output in ("a", 3, "a")],
        r"data\.jsonl:2: output: expected a string, got a number",
    ),
}


@pytest.mark.parametrize("problem", list(BAD_FILES))
def test_a_bad_row_names_the_file_line_and_field(tmp_path, problem):
    lines, message = BAD_FILES[problem]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(BadRowError, match=message):
        load(path)


@pytest.mark.parametrize("problem", list(BAD_FILES))
def test_skip_bad_rows_counts_bad_rows_and_reads_on(tmp_path, problem):
    lines, _ = BAD_FILES[problem]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    loaded = load(path, skip_bad_rows=True)
    assert loaded.bad_rows == 1
    assert [example.row for example in loaded.examples] == [1, 3]


def test_a_bad_csv_row_names_its_line(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("instruction,output\nq,a\nq,a,extra\n")
    with pytest.raises(BadRowError, match=r"data\.csv:3: expected 2 fields as in the header row, found 3"):
        load(path)


def test_a_bad_json_list_element_names_its_row(tmp_path):
    path = write_json(tmp_path / "data.json", [conversation(1), "oops"])
    with pytest.raises(BadRowError, match=r"data\.json:2: expected an object .*got a string"):
        load(path)


def test_malformed_json_file_names_its_line_and_column(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('[\n  {"text": "a"},\n  {"text": "b"}\n  {"text": "c"}\n]\n')
    with pytest.raises(DataError, match=r"data\.json:4: invalid JSON: expecting ',' delimiter at column 3; expected a list of objects$"):
        load(path)


def test_an_empty_file_is_an_error(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("\n")
    with pytest.raises(DataError, match=r"no usable rows in .*data\.jsonl$"):
        load(path)


def test_a_file_of_only_bad_rows_is_an_error_even_when_skipping(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("{oops\n[1]\n{also bad\n")
    with pytest.raises(DataError, match=r"no usable rows in .*data\.jsonl \(3 bad rows skipped; the first: .*data\.jsonl:1: invalid JSON"):
        load(path, skip_bad_rows=True)


def test_a_first_row_in_no_known_format_lists_its_keys_and_the_formats(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [{"prompt": "q", "completion": "a"}])
    with pytest.raises(DataError, match=r"data\.jsonl:1: .*its keys: 'prompt', 'completion'; expected one of: OpenAI messages") as caught:
        load(path)
    assert "ShareGPT ('conversations')" in str(caught.value)
    assert "Alpaca ('instruction' + 'output')" in str(caught.value)
    assert not isinstance(caught.value, BadRowError)


@pytest.mark.parametrize("name", ["missing.jsonl", "data.txt"])
def test_a_missing_or_unsupported_file_lists_the_supported_formats(tmp_path, name):
    path = tmp_path / name
    if name == "data.txt":
        path.write_text("hello\n")
    with pytest.raises(DataError, match=rf"{re.escape(name)}: .*supported formats: \.jsonl, \.json, \.csv, \.parquet"):
        load(path)


def test_a_folder_that_is_not_a_saved_dataset_is_an_error(tmp_path):
    with pytest.raises(DataError, match="not one written by datasets.Dataset.save_to_disk"):
        load(tmp_path)


# --- preparing samples --------------------------------------------------------------------------


def test_prepare_samples_counts_truncated_and_dropped_samples(tmp_path, tokenizer):
    long_answer = {"messages": [{"role": "user", "content": "Tell me a story."}, {"role": "assistant", "content": "Once upon a time " * 20}]}
    long_question = {"messages": [{"role": "user", "content": "Why? " * 60}, {"role": "assistant", "content": "Because."}]}
    short = conversation(1)
    loaded = load(write_jsonl(tmp_path / "data.jsonl", [long_answer, long_question, short]))
    prepared = prepare_samples(SFTTrainer(tokenizer), loaded.examples, max_length=64, skip_bad_rows=False)
    assert (prepared.truncated, prepared.dropped, prepared.bad_rows) == (2, 1, 0)
    assert [len(sample) for sample in prepared.samples][0] == 64
    assert all(len(sample) <= 64 and len(sample.labels) == len(sample) for sample in prepared.samples)
    assert len(prepared.samples) == 2


def test_prepare_samples_reports_or_skips_rows_the_trainer_rejects(tmp_path, tokenizer):
    no_answer = {"messages": [{"role": "user", "content": "Hello?"}]}
    loaded = load(write_jsonl(tmp_path / "data.jsonl", [conversation(1), no_answer]))
    with pytest.raises(DataError, match=r"data\.jsonl:2: .*no assistant message"):
        prepare_samples(SFTTrainer(tokenizer), loaded.examples, max_length=64, skip_bad_rows=False)
    prepared = prepare_samples(SFTTrainer(tokenizer), loaded.examples, max_length=64, skip_bad_rows=True)
    assert (len(prepared.samples), prepared.bad_rows) == (1, 1)


def test_prepare_samples_with_nothing_left_is_an_error(tmp_path, tokenizer):
    long_question = {"messages": [{"role": "user", "content": "Why? " * 60}, {"role": "assistant", "content": "Because."}]}
    loaded = load(write_jsonl(tmp_path / "data.jsonl", [long_question]))
    with pytest.raises(DataError, match=r"no usable samples in .*data\.jsonl \(1 with no trained token left within --max-length 32\)"):
        prepare_samples(SFTTrainer(tokenizer), loaded.examples, max_length=32, skip_bad_rows=False)


def test_csv_conversations_are_json_text_in_a_column(tmp_path):
    import csv

    path = tmp_path / "chats.csv"
    messages = [{"role": "user", "content": "Hi, there"}, {"role": "assistant", "content": "Hello!"}]
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["messages", "topic"])
        writer.writerow([json.dumps(messages), "greeting"])
        writer.writerow(['[{"role": "user"', "truncated"])
    loaded = load_examples([str(path)], seed=0, skip_bad_rows=True)
    assert [example.messages for example in loaded.examples] == [messages]
    assert loaded.examples[0].columns == {"topic": "greeting"}
    assert loaded.bad_rows == 1
    with pytest.raises(DataError, match=r"chats.csv:3: messages: looks like a JSON list of turns but does not parse"):
        load_examples([str(path)], seed=0, skip_bad_rows=False)


def test_sft_points_out_plain_text_rows_once_since_they_train_on_every_token(tmp_path, tokenizer, capsys):
    path = write_jsonl(tmp_path / "text.jsonl", [{"text": "plain"}, {"text": "more"}])
    prepare_samples(SFTTrainer(tokenizer), load(path).examples, max_length=64, skip_bad_rows=False)
    err = capsys.readouterr().err
    assert err.count("note:") == 1 and f"{path}:1 and other plain text rows are trained on every token" in err
    chats = write_jsonl(tmp_path / "chats.jsonl", [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}])
    prepare_samples(SFTTrainer(tokenizer), load(chats).examples, max_length=64, skip_bad_rows=False)
    assert "note:" not in capsys.readouterr().err
