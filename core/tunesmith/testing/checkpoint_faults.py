"""The checkpoint fault suite: a pytest plugin trainer, strategy and optimizer plugins run against themselves.

Each check runs a short training command (yours) three ways: uninterrupted, with a fault, and
again after the fault, the way a user re-runs the same command. It passes when the fault is
reported clearly, the previous checkpoint stays intact, and the re-run ends with the same
final weights as the uninterrupted run. The faults: the newest checkpoint damaged (truncated,
one bit flipped, its weights file lost), the process killed in the middle of a save, and a
save the disk refuses (full, failing, read-only).

In the plugin distribution's tests::

    import pytest

    pytest_plugins = ["tunesmith.testing"]

    @pytest.fixture
    def tunesmith_fault_command(tiny_model, tiny_dataset):
        # a deterministic run; the suite adds --output-dir, --max-steps and --save-steps
        return ["dpo", "--model", tiny_model, "--dataset", tiny_dataset, "--precision", "fp32", "--my-option", "3"]

and in a test module::

    from tunesmith.testing import CheckpointFaults

    class TestMyTrainerCheckpointFaults(CheckpointFaults):
        pass

To run every process of a multi-process strategy under a launcher, override
``tunesmith_fault_launcher`` (for example with ``[sys.executable, "-m", "torch.distributed.run",
"--standalone", "--nproc-per-node", "2"]``).
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tunesmith.manifest import verify_folder
from tunesmith.testing.faults import flip_a_bit, truncate_file

STEPS = 6
SAVE_STEPS = 2
#: a run of STEPS writes checkpoint-2, checkpoint-4, ...; the second folder written is checkpoint-4
NEWEST = f"checkpoint-{2 * SAVE_STEPS}"
PREVIOUS = f"checkpoint-{SAVE_STEPS}"
DAMAGES = {"truncated": truncate_file, "bit-flipped": flip_a_bit, "missing": Path.unlink}
DISK_FAULTS = {"enospc": "no space is left on the device", "eio": "input/output error", "erofs": "read-only"}
RUN_TIME_LIMIT_S = 600


@pytest.fixture
def tunesmith_fault_command() -> list[str]:
    """The training command under test, without ``--output-dir``, ``--max-steps`` and ``--save-steps``."""
    pytest.fail(
        "the tunesmith checkpoint fault suite needs a training command: define a fixture `tunesmith_fault_command` "
        "returning its arguments, e.g. ['sft', '--model', MODEL_DIR, '--dataset', DATA_FILE, '--precision', 'fp32']",
        pytrace=False,
    )


@pytest.fixture
def tunesmith_fault_launcher() -> list[str]:
    """What starts ``-m MODULE ARGS``: this Python, or a launcher such as ``torch.distributed.run``."""
    return [sys.executable]


_finished_runs: dict[tuple[str, ...], Path] = {}


class CheckpointFaults:
    """Checks every trainer, strategy and optimizer must pass. Subclass it as ``Test...``."""

    @pytest.fixture
    def run(self, tunesmith_fault_command, tunesmith_fault_launcher):
        def run(output: Path, steps: int = STEPS, fault: str | None = None) -> subprocess.CompletedProcess:
            module = ["-m", "tunesmith.testing", "--fault", fault, "--at-write", "2", "--"] if fault else ["-m", "tunesmith"]
            command = [*tunesmith_fault_command, "--output-dir", output, "--max-steps", steps, "--save-steps", SAVE_STEPS]
            return subprocess.run(
                [*tunesmith_fault_launcher, *module, *map(str, command)], capture_output=True, text=True, timeout=RUN_TIME_LIMIT_S
            )

        return run

    @pytest.fixture
    def finished_run(self, run, tunesmith_fault_command, tunesmith_fault_launcher, tmp_path_factory):
        """The output folder of an uninterrupted run of ``steps`` (each command and length run once per session)."""

        def finished_run(steps: int) -> Path:
            key = tuple(map(str, [*tunesmith_fault_launcher, *tunesmith_fault_command, steps]))
            if key not in _finished_runs:
                output = tmp_path_factory.mktemp("uninterrupted")
                _check_succeeded(run(output, steps=steps), f"the uninterrupted run of {steps} steps")
                _finished_runs[key] = output
            return _finished_runs[key]

        return finished_run

    @pytest.fixture
    def reference(self, finished_run) -> dict[str, torch.Tensor]:
        """The final weights of the uninterrupted run."""
        return final_weights(finished_run(STEPS) / "final")

    @pytest.mark.parametrize("damage", sorted(DAMAGES))
    def test_a_damaged_newest_checkpoint_is_passed_over(self, run, finished_run, reference, tmp_path, damage):
        output = tmp_path / "run"
        shutil.copytree(finished_run(2 * SAVE_STEPS), output)
        DAMAGES[damage](largest_weights_file(output / NEWEST))

        rerun = run(output)
        _check_succeeded(rerun, "the re-run after the damage")
        assert f"{output / NEWEST} is damaged" in rerun.stderr, rerun.stderr
        assert f"resuming from {output / PREVIOUS}" in rerun.stdout, rerun.stdout
        assert (output / "damaged" / NEWEST).is_dir(), "the damaged checkpoint must be kept for inspection"
        assert_same_weights(final_weights(output / "final"), reference)

    def test_a_kill_during_a_save_loses_only_the_steps_since_the_previous_checkpoint(self, run, reference, tmp_path, tunesmith_fault_launcher):
        output = tmp_path / "run"
        killed = run(output, fault="kill")
        assert killed.returncode != 0, "the fault never fired: does the run write a checkpoint every --save-steps?"
        if tunesmith_fault_launcher == [sys.executable]:
            assert killed.returncode == -signal.SIGKILL, f"the run failed before the fault (exit {killed.returncode}):\n{killed.stderr[-4000:]}"
        assert not (output / NEWEST).exists() and verify_folder(output / PREVIOUS) == []

        rerun = run(output)
        _check_succeeded(rerun, "the re-run after the kill")
        assert f"resuming from {output / PREVIOUS}" in rerun.stdout, rerun.stdout
        assert_same_weights(final_weights(output / "final"), reference)

    @pytest.mark.parametrize("fault", sorted(DISK_FAULTS))
    def test_a_save_the_disk_refuses_stops_with_a_message_and_keeps_the_previous_checkpoint(
        self, run, tmp_path, fault, tunesmith_fault_launcher
    ):
        output = tmp_path / "run"
        failed = run(output, fault=fault)
        assert failed.returncode == 1, failed.stderr
        message = failed.stderr
        if tunesmith_fault_launcher == [sys.executable]:  # a launcher adds its own report of the failed process
            assert "Traceback" not in message, message
        assert f"could not write {output / NEWEST}: " in message and DISK_FAULTS[fault] in message, message
        assert f"The newest complete checkpoint is {output / PREVIOUS}" in message, message
        assert "--save-total-limit" in message and "--output-dir" in message, message
        assert not (output / NEWEST).exists() and verify_folder(output / PREVIOUS) == []
        assert not [path.name for path in output.iterdir() if path.name.startswith(".staging-")], "the staging folder was left behind"

    def test_a_run_stopped_by_a_full_disk_resumes_where_it_stopped(self, run, reference, tmp_path):
        output = tmp_path / "run"
        assert run(output, fault="enospc").returncode == 1
        rerun = run(output)
        _check_succeeded(rerun, "the re-run after the failed save")
        assert f"resuming from {output / PREVIOUS}" in rerun.stdout, rerun.stdout
        assert_same_weights(final_weights(output / "final"), reference)


def largest_weights_file(checkpoint: Path) -> Path:
    """The checkpoint's biggest file that is not a tokenizer or a JSON file: model, adapter or optimizer state."""
    candidates = [path for path in checkpoint.rglob("*") if path.is_file() and path.suffix != ".json" and not path.name.startswith("tokenizer")]
    return max(candidates, key=lambda path: path.stat().st_size)


def final_weights(folder: Path) -> dict[str, torch.Tensor]:
    weights: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        weights.update(load_file(path))
    assert weights, f"{folder} holds no safetensors weights"
    return weights


def assert_same_weights(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    different = [name for name in expected if not torch.equal(actual[name], expected[name])]
    assert not different, f"the resumed run's final weights differ from the uninterrupted run's: {different[:5]}"


def _check_succeeded(result: subprocess.CompletedProcess, what: str) -> None:
    assert result.returncode == 0, f"{what} failed (exit {result.returncode}):\n{result.stderr[-4000:]}"
