"""Every atomically written folder carries a manifest; ``tunesmith verify`` names what is wrong,
and a damaged checkpoint named with ``--resume`` is refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tests.helpers import chat_rows, run_cli, write_jsonl
from tunesmith.atomic import write_atomically
from tunesmith.manifest import MANIFEST_FILE, verify_folder
from tunesmith.testing.faults import flip_a_bit, truncate_file

DAMAGES = {"truncated": truncate_file, "bit-flipped": flip_a_bit, "missing": Path.unlink}
EXPECTED = {"truncated": "bytes, the manifest says", "bit-flipped": "different content", "missing": "is missing"}


def test_a_manifest_names_every_damaged_file(tmp_path):
    folder = tmp_path / "folder"
    write_atomically(folder, lambda staging: [(staging / name).write_bytes(bytes(range(200)) * 3) for name in ("a.bin", "b.bin", "c.bin")])
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    assert sorted(manifest["files"]) == ["a.bin", "b.bin", "c.bin"]
    assert verify_folder(folder) == []
    truncate_file(folder / "a.bin")
    flip_a_bit(folder / "b.bin")
    (folder / "c.bin").unlink()
    (folder / "stray.txt").write_text("?")
    problems = verify_folder(folder)
    assert [p.split(" ")[0] for p in problems] == ["a.bin", "b.bin", "c.bin", "stray.txt"]
    (folder / MANIFEST_FILE).unlink()
    assert verify_folder(folder) == [f"{MANIFEST_FILE} is missing, so the folder was never completely written"]


def sft(model_dir, data, output, steps):
    return run_cli("sft", "--model", model_dir, "--dataset", data, "--output-dir", output, "--max-steps", str(steps), "--batch-size", "2",
                   "--save-steps", "2", "--precision", "fp32", "--lr-scheduler", "constant", "--learning-rate", "1e-3")


def test_verify_names_each_damaged_file(tiny_model_dir, tmp_path, capsys):
    # Resuming past a damaged checkpoint is the checkpoint fault suite's (tests/test_checkpoint_faults.py).
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(8))
    healthy = tmp_path / "run"
    assert sft(tiny_model_dir, data, healthy, 4) == 0
    capsys.readouterr()
    assert run_cli("verify", healthy) == 0
    assert f"{healthy / 'checkpoint-4'}: ok" in capsys.readouterr().out

    for damage, damage_file in DAMAGES.items():
        output = tmp_path / damage
        shutil.copytree(healthy, output)
        damage_file(output / "checkpoint-4" / "adapter_model.safetensors")
        capsys.readouterr()
        assert run_cli("verify", output) == 1
        out = capsys.readouterr().out
        assert f"{output / 'checkpoint-4'}: damaged" in out and "adapter_model.safetensors" in out and EXPECTED[damage] in out, out
        assert f"{output / 'checkpoint-2'}: ok" in out
        assert run_cli("verify", output / "checkpoint-4") == 1


def test_resume_from_a_named_damaged_checkpoint_is_refused(tiny_model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(4))
    output = tmp_path / "run"
    assert sft(tiny_model_dir, data, output, 2) == 0
    flip_a_bit(output / "checkpoint-2" / "optimizer.pt")
    capsys.readouterr()
    assert run_cli("sft", "--model", tiny_model_dir, "--dataset", data, "--output-dir", output, "--resume", output / "checkpoint-2",
                   "--max-steps", "4", "--batch-size", "2", "--precision", "fp32") != 0
    assert "the checkpoint is damaged (optimizer.pt has the right size but different content" in capsys.readouterr().err
