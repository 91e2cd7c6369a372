"""From ``--dataset`` options to the rows the loop trains on: load, split, tokenize, pack."""

from __future__ import annotations

from dataclasses import dataclass

from tunesmith.data.loading import load_examples, split_validation
from tunesmith.data.packing import pack, unpacked
from tunesmith.data.pipeline import PreparedData, prepare_samples
from tunesmith.data.types import Sample


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
    loaded = load_examples(list(config.dataset), config.seed, config.skip_bad_rows)
    train_examples, eval_examples = loaded.examples, []
    bad_rows = loaded.bad_rows
    if config.eval_dataset:
        loaded_eval = load_examples(list(config.eval_dataset), config.seed, config.skip_bad_rows)
        eval_examples = loaded_eval.examples
        bad_rows += loaded_eval.bad_rows
    elif config.val_split > 0:
        train_examples, eval_examples = split_validation(train_examples, config.val_split, config.seed)

    train = prepare_samples(trainer, train_examples, config.max_length, config.skip_bad_rows)
    bad_rows += train.bad_rows
    arrange = (lambda samples: pack(samples, config.max_length)) if config.packing else unpacked
    evaluation = None
    eval_rows: list[list[Sample]] = []
    if eval_examples:
        evaluation = prepare_samples(trainer, eval_examples, config.max_length, config.skip_bad_rows)
        bad_rows += evaluation.bad_rows
        eval_rows = unpacked(evaluation.samples)
    return TrainingData(arrange(train.samples), eval_rows, train, evaluation, bad_rows)
