"""Models and datasets named by Hub IDs (ORG/NAME), resolved offline from a Hugging Face cache
folder the test lays out as huggingface_hub writes it (refs/main naming a snapshot)."""

from __future__ import annotations

import json
import shutil
import socket
import sys

import pytest

from tests.helpers import chat_rows, run_cli

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cached_repo(cache, kind: str, repo_id: str):
    """The snapshot folder of ``repo_id`` in a Hub cache, with ``refs/main`` pointing at it."""
    repo = cache / f"{kind}s--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    return snapshot


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_training_from_a_model_id_and_a_dataset_id_offline(tiny_model_dir, hub_cache, tmp_path):
    shutil.copytree(tiny_model_dir, cached_repo(hub_cache, "model", "tiny-org/tiny-llama"), dirs_exist_ok=True)
    data = cached_repo(hub_cache, "dataset", "tiny-org/colours") / "data"
    data.mkdir()
    (data / "train-00000-of-00001.jsonl").write_text("".join(json.dumps(row) + "\n" for row in chat_rows(6)))
    (data / "test-00000-of-00001.jsonl").write_text("not read: only the train split is\n")

    output = tmp_path / "run"
    assert run_cli("sft", "--model", "tiny-org/tiny-llama", "--dataset", "tiny-org/colours", "--output-dir", output,
                   "--precision", "fp32", "--max-steps", "2", "--save-steps", "0") == 0
    assert (output / "final" / "adapter_model.safetensors").is_file()


def test_an_id_missing_from_the_cache_offline_names_the_id_and_the_cache(hub_cache, tmp_path, capsys):
    assert run_cli("sft", "--model", "nobody/nothing", "--dataset", tmp_path / "x.jsonl", "--output-dir", tmp_path / "run") != 0
    err = capsys.readouterr().err
    assert "nobody/nothing" in err and str(hub_cache) in err and "HF_HUB_OFFLINE" in err


def test_a_missing_local_file_is_not_taken_for_an_id(tiny_model_dir, hub_cache, tmp_path, capsys):
    assert run_cli("sft", "--model", tiny_model_dir, "--dataset", "data/train.jsonl", "--output-dir", tmp_path / "run") != 0
    err = capsys.readouterr().err
    assert "data/train.jsonl: no such file" in err


def test_modelscope_without_its_package_says_what_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "modelscope", None)  # as if not installed
    assert run_cli("sft", "--hub", "modelscope", "--model", "qwen/Qwen2.5-0.5B", "--dataset", tmp_path / "x.jsonl",
                   "--output-dir", tmp_path / "run") != 0
    assert "pip install modelscope" in capsys.readouterr().err


def test_training_through_modelscope_offline_from_its_cache(tiny_model_dir, hub_cache, tmp_path, monkeypatch, capsys):
    pytest.importorskip("modelscope", reason="ModelScope support needs pip install modelscope")
    cache = tmp_path / "modelscope"
    monkeypatch.setenv("MODELSCOPE_CACHE", str(cache))
    monkeypatch.setattr(socket.socket, "connect", lambda *args: pytest.fail(f"network attempt: {args}"))
    shutil.copytree(tiny_model_dir, cache / "models" / "tiny-org" / "tiny-llama")  # ModelScope's cache layout
    data = cache / "datasets" / "tiny-org" / "colours"
    data.mkdir(parents=True)
    (data / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in chat_rows(6)))

    output = tmp_path / "run"
    assert run_cli("sft", "--hub", "modelscope", "--model", "tiny-org/tiny-llama", "--dataset", "tiny-org/colours",
                   "--output-dir", output, "--precision", "fp32", "--max-steps", "2", "--save-steps", "0") == 0
    assert (output / "final" / "adapter_model.safetensors").is_file()
    assert run_cli("sft", "--hub", "modelscope", "--model", "nobody/nothing", "--dataset", "tiny-org/colours",
                   "--output-dir", tmp_path / "missing") != 0
    err = capsys.readouterr().err
    assert "nobody/nothing" in err and "ModelScope cache" in err and "HF_HUB_OFFLINE" in err
