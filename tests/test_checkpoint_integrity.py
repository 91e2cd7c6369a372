"""Every atomically written folder carries a manifest; resume trusts only checkpoints that match
theirs, moving a damaged one aside; ``tunesmith verify`` names what is wrong."""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import adapter_weights, chat_rows, run_cli, write_jsonl
from tunesmith.atomic import write_atomically
from tunesmith.manifest import MANIFEST_FILE, verify_folder


def truncate(path):
    path.write_bytes(path.read_bytes()[:-7])


def flip_a_bit(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def remove(path):
    path.unlink()


DAMAGES = {"truncated": truncate, "bit-flipped": flip_a_bit, "missing": remove}
EXPECTED = {"truncated": "bytes, the manifest says", "bit-flipped": "different content", "missing": "is missing"}


def test_a_manifest_names_every_damaged_file(tmp_path):
    folder = tmp_path / "folder"
    write_atomically(folder, lambda staging: [(staging / name).write_bytes(bytes(range(200)) * 3) for name in ("a.bin", "b.bin", "c.bin")])
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    assert sorted(manifest["files"]) == ["a.bin", "b.bin", "c.bin"]
    assert verify_folder(folder) == []
    truncate(folder / "a.bin")
    flip_a_bit(folder / "b.bin")
    remove(folder / "c.bin")
    (folder / "stray.txt").write_text("?")
    problems = verify_folder(folder)
    assert [p.split(" ")[0] for p in problems] == ["a.bin", "b.bin", "c.bin", "stray.txt"]
    (folder / MANIFEST_FILE).unlink()
    assert verify_folder(folder) == [f"{MANIFEST_FILE} is missing, so the folder was never completely written"]


def sft(model_dir, data, output, steps):
    return run_cli("sft", "--model", model_dir, "--dataset", data, "--output-dir", output, "--max-steps", str(steps), "--batch-size", "2",
                   "--save-steps", "2", "--precision", "fp32", "--lr-scheduler", "constant", "--learning-rate", "1e-3")


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_newest_checkpoint_is_set_aside_and_the_previous_one_resumed(tiny_model_dir, tmp_path, capsys, damage):
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(8))
    reference = tmp_path / "reference"
    assert sft(tiny_model_dir, data, reference, 6) == 0

    output = tmp_path / "run"
    assert sft(tiny_model_dir, data, output, 4) == 0
    assert run_cli("verify", output) == 0
    capsys.readouterr()
    DAMAGES[damage](output / "checkpoint-4" / "adapter_model.safetensors")

    assert run_cli("verify", output) == 1
    out = capsys.readouterr().out
    assert f"{output / 'checkpoint-4'}: damaged" in out and "adapter_model.safetensors" in out and EXPECTED[damage] in out
    assert f"{output / 'checkpoint-2'}: ok" in out
    assert run_cli("verify", output / "checkpoint-4") == 1

    capsys.readouterr()
    assert sft(tiny_model_dir, data, output, 6) == 0
    captured = capsys.readouterr()
    assert f"warning: {output / 'checkpoint-4'} is damaged" in captured.err and "adapter_model.safetensors" in captured.err
    assert f"resuming from {output / 'checkpoint-2'}" in captured.out
    assert (output / "damaged" / "checkpoint-4").is_dir()  # kept for inspection, not deleted
    for key, value in adapter_weights(reference / "final").items():
        assert torch.equal(adapter_weights(output / "final")[key], value), key


def test_resume_from_a_named_damaged_checkpoint_is_refused(tiny_model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(4))
    output = tmp_path / "run"
    assert sft(tiny_model_dir, data, output, 2) == 0
    flip_a_bit(output / "checkpoint-2" / "optimizer.pt")
    capsys.readouterr()
    assert run_cli("sft", "--model", tiny_model_dir, "--dataset", data, "--output-dir", output, "--resume", output / "checkpoint-2",
                   "--max-steps", "4", "--batch-size", "2", "--precision", "fp32") != 0
    assert "the checkpoint is damaged (optimizer.pt has the right size but different content" in capsys.readouterr().err
