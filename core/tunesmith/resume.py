"""Whether a checkpoint may be resumed by this run: same weights' shapes, same data order over the
same data, and a checkpoint format this run's strategy and process count can read."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunesmith.checkpoint import LoopState, read_loop_state
from tunesmith.data.fingerprint import data_fingerprints
from tunesmith.errors import ConfigError

#: options a checkpoint can only be resumed with unchanged: they shape the weights and optimizer
#: state, or decide which rows each step sees (the global batch, not how it is split).
RESUME_INVARIANTS = (
    "model", "adapter", "lora_rank", "lora_alpha", "target_modules", "optimizer",
    "dataset", "val_split", "packing", "max_length", "seed",
)


def run_identity(trainer_name: str, config, global_batch: int, checkpoint_format: str, world_size: int) -> dict[str, Any]:
    options = config.to_dict()
    return {
        "trainer": trainer_name,
        **{key: options[key] for key in RESUME_INVARIANTS},
        "global_batch": global_batch,
        "checkpoint_format": checkpoint_format,
        "world_size": world_size,
        # what the data files held (tunesmith.data.fingerprint), compared by check_data_unchanged
        "data": data_fingerprints(config),
    }


def check_identity(checkpoint: Path, identity: dict[str, Any], strategy: str, reshards: bool) -> None:
    """Refuse a checkpoint written by a run with other options, or by a process count ``strategy`` cannot reshard."""
    saved = read_loop_state(checkpoint).run_identity
    different = [
        key for key in identity
        if key in saved and key != "data" and saved[key] != identity[key] and (key != "world_size" or not reshards)
    ]
    if not different:
        check_data_unchanged(checkpoint, saved.get("data", {}), identity["data"])
        return
    changed = "; ".join(f"{key}: {saved[key]!r} in the checkpoint, {identity[key]!r} now" for key in different)
    written_by = f"the checkpoint was written by {saved.get('world_size')} process(es) and this run has {identity['world_size']}"
    if "world_size" in different:
        advice = (
            f"{written_by}, and --strategy {strategy} with these options resumes only on the process count that wrote it; "
            f"run {saved['world_size']} process(es), or use another --output-dir to start afresh"
        )
    elif "global_batch" in different and saved.get("world_size") != identity["world_size"]:
        advice = (
            f"{written_by}; keep --batch-size x --grad-accum x processes at {saved['global_batch']} "
            "(e.g. change --grad-accum), or use another --output-dir to start afresh"
        )
    else:
        advice = "use the same options, or another --output-dir to start afresh"
    raise ConfigError(f"{checkpoint} was written by a run with other options ({changed}); {advice}")


def check_data_unchanged(checkpoint: Path, saved: dict, now: dict) -> None:
    """Refuse a data file or folder whose content changed since ``checkpoint`` was written under the same path.

    A checkpoint from before fingerprints were kept has none, and is accepted.
    """
    for option, files in saved.items():
        for path, then in files.items():
            current = now.get(option, {}).get(path)
            if current is None or current == then:
                continue  # a path no longer given is an option change, which the run identity compares
            if current["bytes"] != then["bytes"]:
                how = f"it had {then['bytes']:,} bytes then and has {current['bytes']:,} now"
            else:
                how = "its size is the same but its content differs"
            flag = "--" + option.replace("_", "-")
            harm = (
                "evaluation would no longer be comparable with the earlier steps'" if option == "eval_dataset"
                else "the checkpoint's place in the data order would point at other rows"
            )
            raise ConfigError(
                f"{flag} {path} changed since {checkpoint} was written ({how}), so {harm}. "
                "Restore the file as it was, or use another --output-dir to start afresh on the new data"
            )


def check_within_schedule(checkpoint: Path, total_steps: int) -> None:
    saved = read_loop_state(checkpoint)
    if saved.step > total_steps:
        planned = f" (its run planned {saved.total_steps})" if saved.total_steps else ""
        raise ConfigError(
            f"{checkpoint} is at step {saved.step}{planned}, past this run's {total_steps} steps; "
            "raise --max-steps or --epochs, or use another --output-dir to start afresh"
        )


def schedule_change(saved: LoopState, total_steps: int, scheduler: str, rate_then: float, rate_now: float) -> str | None:
    """What resuming ``saved`` on a schedule of another length does to the learning rate; None when the length is the same.

    The schedule (warm-up included) is this run's, over its ``total_steps``, taken up at the
    checkpoint's step: raising --max-steps on a finished cosine or linear run brings the rate
    back up from where the old schedule had decayed it.
    """
    if not saved.total_steps or saved.total_steps == total_steps:
        return None
    return (
        f"the learning-rate schedule now spans {total_steps} steps where the checkpoint's run planned {saved.total_steps}: "
        f"--lr-scheduler {scheduler} (and any warm-up) is recomputed over {total_steps} steps, so step {saved.step + 1} "
        f"trains at learning rate {rate_now:.2e} where the old schedule gave {rate_then:.2e}"
    )
