"""Where each optimizer step's rows come from: the loop asks a step source for the next step.

By default the rows are the dataset's, in a seeded order (:class:`DatasetSteps`). A trainer
whose rows are made by the model (GRPO: generate, score, keep for several updates) returns its
own :class:`StepSource` from :meth:`~tunesmith.trainer.Trainer.step_source`. Either way the loop
is the same: it asks for a step, trains on this process's micro-batches, and saves the source's
state in every checkpoint, so a resumed run continues with exactly the step it would have taken.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tunesmith.data.order import BatchOrder
from tunesmith.data.sharding import shard_step
from tunesmith.errors import ConfigError

if TYPE_CHECKING:
    from tunesmith.strategy import Strategy


@dataclass
class Step:
    """One optimizer step's rows for this process."""

    #: this process's micro-batches of rows; an empty one (the step's rows ran out) runs at zero weight
    pieces: list[list[Any]]
    #: a row to run in place of an empty piece (forward and backward are collective)
    filler: list[Any]
    #: what making the step measured (rollout time, rewards ...), already over every process; logged with the step
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class StepPlan:
    """The shape of a step, given to a trainer's step source."""

    #: rows of one optimizer step over every data-parallel process
    global_batch: int
    #: rows of one micro-batch
    batch_size: int
    seed: int
    #: whether rows of similar length share steps (:class:`~tunesmith.data.order.BatchOrder`)
    group_by_length: bool = False


class StepSource(ABC):
    #: optimizer steps in one pass over the data (``--epochs`` counts these)
    steps_per_epoch: int

    @abstractmethod
    def next_step(self, model) -> Step:
        """The next step's rows; ``model`` is the policy as the strategy wrapped it."""

    @abstractmethod
    def epoch_progress(self) -> float:
        """Epochs done, as a fraction (2.5 is half-way through the third)."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Where the source is (tensors and plain values). Every process calls it at the same
        point before a checkpoint, so it may use collectives; the first process's result is saved."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Go back to where :meth:`state_dict` was taken; every process is given the saved state."""


class DatasetSteps(StepSource):
    """The dataset's rows, a global batch per step in a fresh seeded order each epoch, dealt out to the processes."""

    def __init__(self, rows: list[Any], plan: StepPlan, strategy: Strategy):
        self.rows = rows
        self.plan = plan
        self.strategy = strategy
        lengths = [sum(len(unit) for unit in row) for row in rows] if plan.group_by_length else None
        self.order = BatchOrder(len(rows), plan.global_batch, plan.seed, lengths)
        self.steps_per_epoch = self.order.steps_per_epoch
        self.epoch, self.epoch_rows = 0, 0

    def next_step(self, model) -> Step:
        step_rows = [self.rows[i] for i in self.order.step_rows(self.epoch, self.epoch_rows)]
        self.epoch, self.epoch_rows = self.order.advance(self.epoch, self.epoch_rows)
        pieces = shard_step(step_rows, self.strategy.dp_size, self.strategy.dp_rank, self.plan.batch_size)
        return Step(pieces, step_rows[:1])

    def epoch_progress(self) -> float:
        return self.order.epoch_progress(self.epoch, self.epoch_rows)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "epoch_rows": self.epoch_rows, "group_by_length": self.plan.group_by_length}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # Checkpoints from before grouping existed do not say; their order is taken as it is now.
        grouped = bool(state.get("group_by_length", self.plan.group_by_length))
        if grouped != self.plan.group_by_length:
            raise ConfigError(
                f"the checkpoint's run {'grouped' if grouped else 'did not group'} rows by length and this one "
                f"{'does' if self.plan.group_by_length else 'does not'}: the rest of the epoch would be other rows; "
                f"resume with {'--group-by-length' if grouped else '--no-group-by-length'}"
            )
        self.epoch, self.epoch_rows = int(state["epoch"]), int(state["epoch_rows"])
