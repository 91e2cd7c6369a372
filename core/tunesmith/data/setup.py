"""From ``--dataset`` options to the rows the loop trains on: load, split, tokenize, pack."""

from __future__ import annotations

from dataclasses import dataclass

from tunesmith.data.loading import load_examples, split_validation
from tunesmith.data.packing import pack, unpacked
from tunesmith.data.pipeline import PreparedData, prepare_samples
from tunesmith.data.types import Sample
from tunesmith.launch import ProcessEnvironment
from tunesmith.runtime import warn


@dataclass
class TrainingData:
    train_rows: list[list[Sample]]
    eval_rows: list[list[Sample]]
    train: PreparedData
    eval: PreparedData | None
    bad_rows: int

    def describe(self) -> str:
        text = (
            f"data: {len(self.train.samples)} training samples in {len(self.train_rows)} rows; "
            f"{self.train.truncated} truncated to --max-length, {self.train.dropped} dropped (nothing left to train), "
            f"{self.bad_rows} bad rows skipped"
        )
        if self.eval is not None:
            text += f"; {len(self.eval.samples)} evaluation samples"
        return text


def build_training_data(trainer, config) -> TrainingData:
    loaded = load_examples(list(config.dataset), config.seed, config.skip_bad_rows, trainer.row_formats, config.hub)
    train_examples, eval_examples = loaded.examples, []
    bad_rows = loaded.bad_rows
    if config.eval_dataset:
        loaded_eval = load_examples(list(config.eval_dataset), config.seed, config.skip_bad_rows, trainer.row_formats, config.hub)
        eval_examples = loaded_eval.examples
        bad_rows += loaded_eval.bad_rows
    elif config.val_split > 0:
        train_examples, eval_examples = split_validation(train_examples, config.val_split, config.seed)

    train = prepare_samples(trainer, train_examples, config.max_length, config.skip_bad_rows)
    bad_rows += train.bad_rows
    if config.packing:
        train_rows = pack(train.samples, config.max_length)
        _warn_when_packed_into_less_than_a_batch(len(train.samples), len(train_rows), config)
    else:
        train_rows = unpacked(train.samples)
    evaluation = None
    eval_rows: list[list[Sample]] = []
    if eval_examples:
        evaluation = prepare_samples(trainer, eval_examples, config.max_length, config.skip_bad_rows)
        bad_rows += evaluation.bad_rows
        eval_rows = unpacked(evaluation.samples)
    return TrainingData(train_rows, eval_rows, train, evaluation, bad_rows)


def _warn_when_packed_into_less_than_a_batch(samples: int, rows: int, config) -> None:
    """Many short samples packed into long rows can leave fewer rows than one optimizer step
    takes: then every step trains on all of them, and an epoch is a single step."""
    environment = ProcessEnvironment.from_environ()
    global_batch = config.batch_size * config.grad_accum * environment.world_size
    if rows >= global_batch or environment.rank != 0:
        return
    processes = f" x {environment.world_size} processes" if environment.world_size > 1 else ""
    warn(
        f"--packing put the {samples} training samples into {rows} rows of up to --max-length {config.max_length} tokens, "
        f"fewer than one global batch of {global_batch} (--batch-size {config.batch_size} x --grad-accum {config.grad_accum}{processes}), "
        "so every step trains on all of them and an epoch is a single step; "
        "for more, smaller steps use a smaller --max-length, --batch-size or --grad-accum"
    )
