"""A checkpoint that will not fit stops the run before it is written; a write the disk refuses
anyway names the fault, removes the partial folder and keeps the previous checkpoint newest.

Where the platform allows, the disk is a real size-limited tmpfs the test mounts in a private
namespace (``tunesmith.testing.faults.small_filesystem_command``); the free space a run sees is
also faked at ``shutil.disk_usage`` so the check is tested everywhere.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from collections import namedtuple

import pytest
import torch

import tunesmith.storage as storage
from tests.helpers import adapter_weights, chat_rows, run_cli, write_jsonl
from tunesmith.manifest import verify_folder
from tunesmith.storage import folder_bytes
from tunesmith.testing.faults import small_filesystem_command, small_filesystems_supported

needs_small_filesystems = pytest.mark.skipif(
    not small_filesystems_supported(), reason="this platform cannot mount a size-limited tmpfs in a user namespace"
)


def sft_arguments(model_dir, data, output, steps):
    return ["sft", "--model", model_dir, "--dataset", data, "--output-dir", output, "--max-steps", str(steps), "--save-steps", "2",
            "--batch-size", "2", "--precision", "fp32", "--lr-scheduler", "constant", "--learning-rate", "1e-3"]


def test_a_checkpoint_that_will_not_fit_stops_the_run_before_writing(tiny_model_dir, tmp_path, monkeypatch, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(8))
    output = tmp_path / "run"
    real_disk_usage = shutil.disk_usage
    free_after_first = []

    def disk_usage(path):
        usage = real_disk_usage(path)
        if (output / "checkpoint-2").is_dir():  # room for the first checkpoint only
            free_after_first.append(folder_bytes(output / "checkpoint-2") // 2)
            return namedtuple("usage", "total used free")(usage.total, usage.used, free_after_first[-1])
        return usage

    monkeypatch.setattr(storage.shutil, "disk_usage", disk_usage)
    capsys.readouterr()
    assert run_cli(*sft_arguments(tiny_model_dir, data, output, 6)) == 1
    message = capsys.readouterr().err
    size = folder_bytes(output / "checkpoint-2")
    assert f"not enough disk space to write {output / 'checkpoint-4'}: it needs about {storage.human_bytes(size)} (as much as checkpoint-2)" in message
    assert f"{output} has {storage.human_bytes(free_after_first[-1])} free; stopped before writing" in message
    assert f"The newest complete checkpoint is {output / 'checkpoint-2'} (step 2)" in message
    assert "--save-total-limit (now 0, keeping all)" in message and "another --output-dir" in message
    assert sorted(path.name for path in output.iterdir() if path.is_dir()) == ["checkpoint-2"]
    assert verify_folder(output / "checkpoint-2") == []


def test_the_first_checkpoint_is_checked_against_an_estimate_from_the_state(tiny_model_dir, tmp_path, monkeypatch, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(4))
    monkeypatch.setattr(storage, "free_bytes", lambda path: 1000)
    capsys.readouterr()
    assert run_cli(*sft_arguments(tiny_model_dir, data, tmp_path / "run", 2)) == 1
    message = capsys.readouterr().err
    assert "(estimated from the model and optimizer state)" in message and "has 1.0 KB free" in message
    assert "No checkpoint was written yet" in message


def test_making_room_never_deletes_the_newest_complete_checkpoint(tmp_path):
    from tunesmith.checkpoint import rotate_checkpoints

    for step in (2, 4, 6):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    assert [path.name for path in rotate_checkpoints(tmp_path, 2, making_room=True)] == ["checkpoint-2", "checkpoint-4"]
    assert rotate_checkpoints(tmp_path, 1, making_room=True) == []
    assert (tmp_path / "checkpoint-6").is_dir()


WRITE_ON_A_FULL_DISK = """
import json, sys
from pathlib import Path
import torch
from safetensors.torch import save_file
from tunesmith.atomic import write_atomically
from tunesmith.errors import StorageError

target = Path(sys.argv[1])
write_atomically(target, lambda staging: (staging / "small.txt").write_text("the previous folder"))
results = {}
for name, write in {
    "torch.save": lambda staging: torch.save(torch.zeros(1 << 20), staging / "big.pt"),
    "safetensors": lambda staging: save_file({"w": torch.zeros(1 << 20)}, staging / "big.safetensors"),
}.items():
    try:
        write_atomically(target, write)
        results[name] = "written"
    except StorageError as error:
        results[name] = str(error)
results["left"] = sorted(path.name for path in target.parent.iterdir())
results["previous"] = (target / "small.txt").read_text()
print(json.dumps(results))
"""


@needs_small_filesystems
def test_a_write_that_fills_the_disk_is_named_and_cleaned_up(tmp_path):
    """torch.save reports a full disk as a RuntimeError, safetensors as its own error: both are recognised."""
    script = tmp_path / "write.py"
    script.write_text(WRITE_ON_A_FULL_DISK)
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(
        small_filesystem_command(mount, 1 << 20, f"{shlex.quote(sys.executable)} {script} {mount / 'folder'}"),
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    results = json.loads(result.stdout.splitlines()[-1])
    for writer in ("torch.save", "safetensors"):
        assert results[writer].startswith(f"could not write {mount / 'folder'}: no space is left on the device"), results
        assert f"The partly written folder was removed; {mount / 'folder'} is unchanged" in results[writer]
    assert results["left"] == ["folder"] and results["previous"] == "the previous folder"


@needs_small_filesystems
@pytest.mark.slow
def test_a_run_on_a_nearly_full_disk_stops_and_resumes_elsewhere(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(8))
    reference = tmp_path / "reference"
    assert run_cli(*sft_arguments(tiny_model_dir, data, reference, 6)) == 0
    room = int(folder_bytes(reference / "checkpoint-2") * 1.5) + (256 << 10)  # one checkpoint, config and metrics

    mount, kept = tmp_path / "disk", tmp_path / "kept"
    mount.mkdir()
    run = [sys.executable, "-m", "tunesmith", *map(str, sft_arguments(tiny_model_dir, data, mount / "run", 6))]
    script = f"{shlex.join(run)}; status=$?; cp -a {mount / 'run'} {kept}; exit $status"
    result = subprocess.run(small_filesystem_command(mount, room, script), capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert f"not enough disk space to write {mount / 'run' / 'checkpoint-4'}" in result.stderr, result.stderr
    assert f"The newest complete checkpoint is {mount / 'run' / 'checkpoint-2'} (step 2)" in result.stderr
    assert verify_folder(kept / "checkpoint-2") == [] and not (kept / "checkpoint-4").exists()

    # The way out the message names: the run folder copied to a disk with room, the same command there.
    resumed = subprocess.run([*run[:run.index("--output-dir") + 1], str(kept), *run[run.index("--output-dir") + 2:]],
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from {kept / 'checkpoint-2'}" in resumed.stdout
    for key, value in adapter_weights(reference / "final").items():
        assert torch.equal(adapter_weights(kept / "final")[key], value), key
