"""``tunesmith infer --file``: batched replies equal one-at-a-time ones, and a stopped run resumes exactly."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

import tunesmith.batch_inference as batch_inference
from tests.helpers import run_cli, write_jsonl
from tunesmith.generation import GenerationOptions, generate_reply

QUESTIONS = ["Hello!", "What is the capital of France?", "Write a haiku about rain.", "Count to three.", "Name a colour.", "Why?"]
MAX_NEW_TOKENS = 8


# Every prompt shape the command reads, with an extra column to carry through.
ROWS = [
    {"id": index, "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": question}] if index % 2 else question}
    for index, question in enumerate(QUESTIONS)
]


def prompt_file(path):
    return write_jsonl(path, ROWS)


def conversation(row: dict) -> list[dict]:
    return row["prompt"] if isinstance(row["prompt"], list) else [{"role": "user", "content": row["prompt"]}]


@pytest.fixture(scope="module")
def expected_replies(talkative_model_dir):
    """Each reply generated alone, through the single-prompt path ``infer --prompt`` uses."""
    tokenizer = AutoTokenizer.from_pretrained(talkative_model_dir)
    model = AutoModelForCausalLM.from_pretrained(talkative_model_dir).eval()
    options = GenerationOptions(max_new_tokens=MAX_NEW_TOKENS)
    return [generate_reply(model, tokenizer, conversation(row), options) for row in ROWS]


def read_output(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def infer(talkative_model_dir, prompts, output, *extra) -> int:
    return run_cli("infer", "--model", talkative_model_dir, "--file", prompts, "--output", output, "--max-new-tokens", MAX_NEW_TOKENS, "--precision", "fp32", *extra)


def test_batched_replies_equal_one_at_a_time(talkative_model_dir, expected_replies, tmp_path, capsys):
    prompts, output = prompt_file(tmp_path / "prompts.jsonl"), tmp_path / "out.jsonl"
    assert infer(talkative_model_dir, prompts, output, "--batch-size", "4") == 0
    assert f"wrote {len(QUESTIONS)} replies into {output}" in capsys.readouterr().out
    rows = read_output(output)
    assert [row["id"] for row in rows] == list(range(len(QUESTIONS)))
    assert [row["response"] for row in rows] == expected_replies
    assert len(set(expected_replies)) > 1, "the replies must differ for the order to be checked"


def test_a_run_stopped_part_way_resumes_every_row_exactly_once(talkative_model_dir, expected_replies, tmp_path, monkeypatch, capsys):
    prompts, output = prompt_file(tmp_path / "prompts.jsonl"), tmp_path / "out.jsonl"
    real, calls = batch_inference.generate_batch, []

    def fails_on_the_third_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected fault")
        return real(*args, **kwargs)

    monkeypatch.setattr(batch_inference, "generate_batch", fails_on_the_third_batch)
    assert infer(talkative_model_dir, prompts, output, "--batch-size", "2") != 0
    assert len(read_output(output)) == 4
    monkeypatch.setattr(batch_inference, "generate_batch", real)

    capsys.readouterr()
    assert infer(talkative_model_dir, prompts, output, "--batch-size", "2") == 0
    assert f"wrote 2 replies into {output} (4 already there" in capsys.readouterr().out
    rows = read_output(output)
    assert [row["id"] for row in rows] == list(range(len(QUESTIONS)))
    assert [row["response"] for row in rows] == expected_replies


def test_a_half_written_last_line_is_generated_again(talkative_model_dir, expected_replies, tmp_path, capsys):
    prompts, output = prompt_file(tmp_path / "prompts.jsonl"), tmp_path / "out.jsonl"
    first = json.dumps({**ROWS[0], "response": expected_replies[0]}) + "\n"
    output.write_text(first + '{"id": 1, "prompt": [{"ro')
    assert infer(talkative_model_dir, prompts, output) == 0
    assert f"wrote {len(QUESTIONS) - 1} replies into {output} (1 already there" in capsys.readouterr().out
    rows = read_output(output)
    assert [row["id"] for row in rows] == list(range(len(QUESTIONS)))
    assert [row["response"] for row in rows] == expected_replies


def test_seeded_sampling_is_the_same_whatever_the_batch_size(talkative_model_dir, tmp_path):
    prompts = prompt_file(tmp_path / "prompts.jsonl")
    sampling = ("--temperature", "1.0", "--seed", "7")
    assert infer(talkative_model_dir, prompts, tmp_path / "one.jsonl", "--batch-size", "1", *sampling) == 0
    assert infer(talkative_model_dir, prompts, tmp_path / "four.jsonl", "--batch-size", "4", *sampling) == 0
    assert read_output(tmp_path / "one.jsonl") == read_output(tmp_path / "four.jsonl")


def test_a_bad_row_is_named_before_anything_is_generated(talkative_model_dir, tmp_path, capsys):
    prompts = write_jsonl(
        tmp_path / "prompts.jsonl",
        [{"messages": [{"role": "user", "content": "Hi"}]}, {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}],
    )
    output = tmp_path / "out.jsonl"
    assert infer(talkative_model_dir, prompts, output) != 0
    assert f"{prompts}:2: messages: ends with a 'assistant' message; expected the user turn" in capsys.readouterr().err
    assert not output.exists()


def test_an_output_longer_than_the_input_is_refused(talkative_model_dir, tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Hi"}])
    output = write_jsonl(tmp_path / "out.jsonl", [{"prompt": "a", "response": "b"}, {"prompt": "c", "response": "d"}])
    assert infer(talkative_model_dir, prompts, output) != 0
    assert "holds 2 rows but the input has only 1" in capsys.readouterr().err


def test_a_killed_run_resumes_every_row_exactly_once(talkative_model_dir, tmp_path):
    questions = [f"Tell me about the number {index}." for index in range(24)]
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"id": index, "prompt": q} for index, q in enumerate(questions)])
    output = tmp_path / "out.jsonl"
    command = [sys.executable, "-m", "tunesmith", "infer", "--model", talkative_model_dir, "--file", prompts, "--output", output]
    options = ["--max-new-tokens", "16", "--precision", "fp32"]
    process = subprocess.Popen([*map(str, command), *options, "--batch-size", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not (output.exists() and output.read_bytes().count(b"\n") >= 2) and time.monotonic() < deadline:
            assert process.poll() is None, "infer ended before it could be killed"
            time.sleep(0.05)
        assert process.poll() is None, "infer finished before it could be killed; give it more rows"
    finally:
        process.kill()
        process.wait()
    written = output.read_bytes().count(b"\n")
    assert 2 <= written < len(questions)

    assert run_cli(*command[3:], *options, "--batch-size", "8") == 0
    assert run_cli(*command[3:-1], tmp_path / "uninterrupted.jsonl", *options, "--batch-size", "8") == 0
    rows = read_output(output)
    assert [row["id"] for row in rows] == list(range(len(questions)))
    assert rows == read_output(tmp_path / "uninterrupted.jsonl")


def test_an_output_of_other_rows_is_refused(talkative_model_dir, tmp_path, capsys):
    prompts = prompt_file(tmp_path / "prompts.jsonl")
    output = tmp_path / "out.jsonl"
    output.write_text(json.dumps({"id": 0, "prompt": "Something else", "response": "b"}) + '\n{"id": 1, "pro')
    before = output.read_bytes()
    assert infer(talkative_model_dir, prompts, output) != 0
    assert f"--output {output}: its row 1 is not the reply to {prompts}:1" in capsys.readouterr().err
    assert output.read_bytes() == before, "a file that is not this input's output must be left as it was"
