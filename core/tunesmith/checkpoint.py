"""Atomic checkpoints: written to a temporary folder, renamed into place only when complete.

A checkpoint ``OUTPUT/checkpoint-STEP/`` holds the trainable weights in safetensors (a peft
adapter folder for LoRA/DoRA, a transformers model folder for full fine-tuning, so any
checkpoint can be loaded for inference), the optimizer state and each process's RNG states in
files that ``torch.load(weights_only=True)`` accepts, and the scheduler and loop state in JSON.
No pickled code is ever written. Which process writes what is the strategy's business
(:meth:`tunesmith.strategy.Strategy.save_checkpoint`); the helpers here write the parts.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from safetensors.torch import load_file

from tunesmith.errors import ConfigError, StorageError
from tunesmith.manifest import STATE_FILE, verify_folder

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
DAMAGED_FOLDER = "damaged"
#: what the trainer keeps across a resume (its ``state_dict``)
TRAINER_FILE = "trainer.pt"
#: where the step source is: the position in the data's order, rollouts kept for more updates
STEPS_FILE = "steps.pt"


@dataclass
class LoopState:
    """Where the loop is: everything besides tensors that a resumed run needs."""

    step: int = 0
    num_tokens: int = 0
    skipped_steps: int = 0
    bad_steps_in_a_row: int = 0
    #: the steps the run planned when it saved (0 in checkpoints from before this was kept)
    total_steps: int = 0
    #: the options that must not change between a checkpoint and the run resuming it
    run_identity: dict[str, Any] = field(default_factory=dict)


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first."""
    found = []
    if output_dir.is_dir():
        for path in output_dir.iterdir():
            match = CHECKPOINT_PATTERN.match(path.name)
            if match and (path / STATE_FILE).is_file():
                found.append((int(match.group(1)), path))
    return sorted(found)


def find_resume_checkpoint(output_dir: Path, resume: str, report: Callable[[str], None] | None = None) -> Path | None:
    """The checkpoint to resume from: ``--resume`` auto takes the newest whose files match its manifest.

    A damaged newer checkpoint is named through ``report`` and moved aside to
    ``OUTPUT/damaged/`` (by the process that reports), never deleted.
    """
    if resume == "never":
        existing = [path.name for _, path in list_checkpoints(output_dir)]
        if existing:
            raise ConfigError(
                f"--resume never: {output_dir} already holds {', '.join(existing)} from an earlier run; a fresh run "
                "there would mix its checkpoints with them. Use another --output-dir, or delete those folders"
            )
        return None
    if resume == "auto":
        for _, checkpoint in reversed(list_checkpoints(output_dir)):
            problems = verify_folder(checkpoint)
            if not problems:
                return checkpoint
            if report is not None:
                moved = move_aside(checkpoint)
                report(f"{checkpoint} is damaged ({'; '.join(problems)}); moved it to {moved} and looked for an older checkpoint")
        return None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise ConfigError(f"--resume {resume}: not a complete checkpoint folder (no {STATE_FILE}); use auto, never or a checkpoint-N folder")
    problems = verify_folder(path)
    if problems:
        raise ConfigError(f"--resume {resume}: the checkpoint is damaged ({'; '.join(problems)}); use another checkpoint or --resume auto")
    return path


def move_aside(checkpoint: Path) -> Path:
    """Move a damaged checkpoint to ``OUTPUT/damaged/`` for inspection; return where it went."""
    damaged = checkpoint.parent / DAMAGED_FOLDER
    damaged.mkdir(exist_ok=True)
    target, attempt = damaged / checkpoint.name, 1
    while target.exists():
        target, attempt = damaged / f"{checkpoint.name}-{attempt}", attempt + 1
    os.rename(checkpoint, target)
    return target


def rotate_checkpoints(output_dir: Path, keep: int, making_room: bool = False) -> list[Path]:
    """Delete the oldest checkpoints beyond ``keep`` (0 keeps all); the newest always survives.

    ``making_room``: called before a new checkpoint is written, so keep one fewer (the new one
    will make up the number), but never the newest complete one until its successor exists.
    """
    if keep <= 0:
        return []
    keep = max(keep - 1, 1) if making_room else keep
    checkpoints = list_checkpoints(output_dir)
    doomed = [path for _, path in checkpoints[: max(0, len(checkpoints) - keep)]]
    for path in doomed:
        shutil.rmtree(path)
    return doomed


@contextmanager
def advice_on_storage_errors(output_dir: Path, save_total_limit: int) -> Iterator[None]:
    """Add to a :class:`StorageError` what the user still has and how to go on."""
    try:
        yield
    except StorageError as error:
        checkpoints = list_checkpoints(output_dir)
        if checkpoints:
            step, newest = checkpoints[-1]
            still = f"The newest complete checkpoint is {newest} (step {step}); the same command run again resumes from it."
        else:
            still = "No checkpoint was written yet, so a new run starts from the beginning."
        limit = f"now {save_total_limit}" if save_total_limit else "now 0, keeping all"
        raise StorageError(
            f"{error}. {still} To go on: free space on that disk, keep fewer checkpoints with --save-total-limit "
            f"({limit}), or use another --output-dir on a disk with room (copy this run folder there to keep its checkpoints)"
        ) from error.__cause__


@dataclass
class TrainingState:
    """What a checkpoint saves and restores; the strategy decides how each part is written."""

    model: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loop_state: LoopState
    tokenizer: Any = None
    #: the trainer, whose :meth:`~tunesmith.trainer.Trainer.state_dict` is saved with the loop state
    trainer: Any = None
    #: where the step source is (:meth:`~tunesmith.steps.StepSource.state_dict`), taken on every process before a save
    step_source_state: dict[str, Any] = field(default_factory=dict)


@dataclass
class LoadedCheckpoint:
    loop_state: LoopState
    scaler_state: dict[str, Any] | None
    step_source_state: dict[str, Any]


def save_replicated(folder: Path, state: TrainingState, model, scaler_state: dict[str, Any] | None = None) -> None:
    """Write state that every process holds whole (``model`` unwrapped) into ``folder``."""
    model.save_pretrained(folder, safe_serialization=True)
    if state.tokenizer is not None:
        state.tokenizer.save_pretrained(folder)
    torch.save(state.optimizer.state_dict(), folder / "optimizer.pt")
    write_loop_files(folder, state, scaler_state)


def write_loop_files(folder: Path, state: TrainingState, scaler_state: dict[str, Any] | None = None) -> None:
    """The scheduler, loss-scaler, trainer and loop state: files every strategy writes the same way."""
    (folder / "scheduler.json").write_text(json.dumps(state.scheduler.state_dict()), encoding="utf-8")
    if scaler_state is not None:
        torch.save(scaler_state, folder / "scaler.pt")
    trainer_state = state.trainer.state_dict() if state.trainer is not None else {}
    if trainer_state:
        torch.save(trainer_state, folder / TRAINER_FILE)
    torch.save(state.step_source_state, folder / STEPS_FILE)
    (folder / STATE_FILE).write_text(json.dumps(asdict(state.loop_state), indent=2), encoding="utf-8")


def load_replicated(folder: Path, state: TrainingState, model) -> LoadedCheckpoint:
    """Restore what :func:`save_replicated` wrote into ``model`` (unwrapped), the optimizer and the scheduler."""
    load_trainable_weights(folder, model)
    state.optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    return read_loop_files(folder, state)


def read_loop_files(folder: Path, state: TrainingState) -> LoadedCheckpoint:
    state.scheduler.load_state_dict(json.loads((folder / "scheduler.json").read_text(encoding="utf-8")))
    if (folder / TRAINER_FILE).is_file() and state.trainer is not None:
        state.trainer.load_state_dict(torch.load(folder / TRAINER_FILE, weights_only=True))
    scaler_path = folder / "scaler.pt"
    scaler_state = torch.load(scaler_path, weights_only=True) if scaler_path.is_file() else None
    return LoadedCheckpoint(read_loop_state(folder), scaler_state, torch.load(folder / STEPS_FILE, weights_only=True))


def read_loop_state(folder: Path) -> LoopState:
    return LoopState(**json.loads((folder / STATE_FILE).read_text(encoding="utf-8")))


def load_trainable_weights(folder: Path, model) -> None:
    """Put a checkpoint's weights back into ``model`` exactly (peft adapter or full model)."""
    adapter_file = folder / "adapter_model.safetensors"
    if adapter_file.is_file():
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, load_file(adapter_file))
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise ConfigError(f"{folder}: adapter weights do not match this model (unexpected {unexpected[:3]})")
        return
    weight_files = sorted(folder.glob("model*.safetensors"))
    if not weight_files:
        raise ConfigError(f"{folder}: no adapter_model.safetensors or model.safetensors to resume from")
    state = {}
    for path in weight_files:
        state.update(load_file(path))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied_embeddings = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    really_missing = [key for key in missing if not (tied_embeddings and key.endswith("lm_head.weight"))]
    if really_missing or unexpected:
        raise ConfigError(f"{folder}: weights do not match this model (missing {really_missing[:3]}, unexpected {unexpected[:3]})")
