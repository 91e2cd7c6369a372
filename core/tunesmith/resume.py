"""Whether a checkpoint may be resumed by this run: same weights' shapes, same data order, and a
checkpoint format this run's strategy and process count can read."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunesmith.checkpoint import read_loop_state
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
    }


def check_identity(checkpoint: Path, identity: dict[str, Any], strategy: str, reshards: bool) -> None:
    """Refuse a checkpoint written by a run with other options, or by a process count ``strategy`` cannot reshard."""
    saved = read_loop_state(checkpoint).run_identity
    different = [key for key in identity if key in saved and saved[key] != identity[key] and (key != "world_size" or not reshards)]
    if not different:
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


def check_within_schedule(checkpoint: Path, total_steps: int) -> None:
    saved = read_loop_state(checkpoint)
    if saved.step > total_steps:
        raise ConfigError(
            f"{checkpoint} is at step {saved.step}, past this run's {total_steps} steps; "
            "raise --max-steps or --epochs, or use another --output-dir to start afresh"
        )
