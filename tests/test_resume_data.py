"""Resuming checks the data too: a dataset file changed under the same path is refused, naming it;
unchanged data resumes, and so does a checkpoint from before fingerprints were kept; a longer
schedule says what it does to the learning rate."""

from __future__ import annotations

import json

import tunesmith.data.fingerprint as fingerprint_module
from tests.helpers import chat_rows, run_cli, write_jsonl
from tunesmith.data.fingerprint import path_fingerprint
from tunesmith.manifest import STATE_FILE, verify_folder, write_manifest


def command(tiny_model_dir, data, output, max_steps, *extra):
    return [
        "sft", "--model", str(tiny_model_dir), "--dataset", str(data), "--output-dir", str(output),
        "--max-steps", str(max_steps), "--save-steps", "2", "--batch-size", "2", *extra,
    ]


def test_a_changed_dataset_is_refused_by_name_and_a_checkpoint_without_fingerprints_is_not(tiny_model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(8))
    evaluation = write_jsonl(tmp_path / "eval.jsonl", chat_rows(2))
    output = tmp_path / "run"
    assert run_cli(*command(tiny_model_dir, data, output, 2, "--eval-dataset", evaluation)) == 0

    capsys.readouterr()
    assert run_cli(*command(tiny_model_dir, data, output, 4, "--eval-dataset", evaluation)) == 0
    out = capsys.readouterr().out
    assert f"resuming from {output / 'checkpoint-2'}" in out
    assert "schedule now spans 4 steps where the checkpoint's run planned 2" in out

    write_jsonl(data, chat_rows(8)[::-1])  # the same rows in another order: same size, other content
    assert run_cli(*command(tiny_model_dir, data, output, 6, "--eval-dataset", evaluation)) == 2
    err = capsys.readouterr().err
    assert f"--dataset {data} changed since {output / 'checkpoint-4'} was written (its size is the same but its content differs)" in err
    assert "Restore the file as it was, or use another --output-dir" in err

    write_jsonl(data, chat_rows(8))  # restored
    write_jsonl(evaluation, chat_rows(3))
    assert run_cli(*command(tiny_model_dir, data, output, 6, "--eval-dataset", evaluation)) == 2
    assert f"--eval-dataset {evaluation} changed" in capsys.readouterr().err

    # A checkpoint written before fingerprints (and the planned step count) were kept resumes unchecked.
    checkpoint = output / "checkpoint-4"
    state = json.loads((checkpoint / STATE_FILE).read_text())
    del state["run_identity"]["data"], state["total_steps"]  # as written before either was kept
    (checkpoint / STATE_FILE).write_text(json.dumps(state))
    (checkpoint / "manifest.json").unlink()
    write_manifest(checkpoint)
    assert verify_folder(checkpoint) == []

    assert run_cli(*command(tiny_model_dir, data, output, 6, "--eval-dataset", evaluation)) == 0
    out = capsys.readouterr().out
    assert f"resuming from {checkpoint}" in out and "schedule now spans" not in out


def test_fingerprints_of_large_files_and_folders_change_with_their_content(tmp_path, monkeypatch):
    # Scaled down so a file of 64 KiB takes the sampled path that a large dataset takes.
    monkeypatch.setattr(fingerprint_module, "WHOLE_FILE_BYTES", 4096)
    monkeypatch.setattr(fingerprint_module, "EDGE_BYTES", 1024)
    monkeypatch.setattr(fingerprint_module, "BLOCK_BYTES", 256)
    big = tmp_path / "folder" / "big.bin"
    big.parent.mkdir()
    content = bytearray(range(256)) * 256
    big.write_bytes(content)
    (tmp_path / "folder" / "small.jsonl").write_text("{}\n")
    first, folder = path_fingerprint(big), path_fingerprint(tmp_path / "folder")
    assert first == path_fingerprint(big) and first["bytes"] == len(content)

    content[-1] ^= 1  # the last bytes are always read
    big.write_bytes(content)
    assert path_fingerprint(big)["blake2b"] != first["blake2b"]
    assert path_fingerprint(tmp_path / "folder") != folder
    assert path_fingerprint(tmp_path / "missing") is None
