"""The ``Trainer`` interface: a training objective plus the data units it trains on.

A trainer never runs the loop, calls ``backward`` or steps the optimizer; the engine
(:mod:`tunesmith.engine`) does that for every trainer alike. A trainer turns an
:class:`~tunesmith.data.types.Example` into a data unit (a causal-LM
:class:`~tunesmith.data.types.Sample`, a preference pair ...), says how to cut a unit to the
maximum length and whether anything in it is left to train, collates rows of units into a
batch, says how many items a batch holds (the loss is normalised over every item of an
optimizer step, across gradient-accumulation micro-batches) and computes the summed loss of a
batch with metrics to log.

Its life: built with the tokenizer and the run's options; :meth:`Trainer.setup` once the
model is placed, with a :class:`TrainerContext` (the strategy, device, precision, plugins,
its own options and a reference model); then, optionally, the source of its steps
(:meth:`~Trainer.step_source`); then batches; its :meth:`~Trainer.state_dict` is saved
in every checkpoint and given back to :meth:`~Trainer.load_state_dict` on resume.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch

from tunesmith.data.examples import CONVERSATION_FORMATS, RowFormat
from tunesmith.data.types import Example, Sample

if TYPE_CHECKING:
    from tunesmith.device import Device
    from tunesmith.plugins import PluginManager
    from tunesmith.reference import ReferenceModel
    from tunesmith.runtime import Runtime
    from tunesmith.steps import StepPlan, StepSource
    from tunesmith.strategy import Strategy


@dataclass
class LossOutput:
    """``loss`` is summed over the batch's items; ``metrics`` are summed the same way."""

    loss: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class TrainerContext:
    """What a trainer may use besides the model it is handed: given to :meth:`Trainer.setup`."""

    strategy: Strategy
    device: Device
    precision: str
    #: every installed plugin (reward functions, for trainers that score completions)
    plugins: PluginManager
    #: the values of the options the trainer's :class:`~tunesmith.records.TrainerSpec` declares
    options: dict[str, Any]
    #: ``make_reference(path)``: the frozen model to compare the policy with, the starting weights
    #: when ``path`` is None (see :class:`~tunesmith.reference.ReferenceModel`)
    make_reference: Callable[[str | None], ReferenceModel]

    @property
    def runtime(self) -> Runtime:
        """The run's device and precision as one :class:`~tunesmith.runtime.Runtime`, for loading further models (a reward model)."""
        from tunesmith.runtime import Runtime

        return Runtime(self.device, "the training run's device", self.precision)


class Trainer(ABC):
    #: registered name, set by the engine when it builds the trainer
    name: str = ""
    #: the row formats its data may come in, from its :class:`~tunesmith.records.TrainerSpec`
    row_formats: tuple[RowFormat, ...] = CONVERSATION_FORMATS

    def __init__(self, tokenizer, config: Any = None):
        self.tokenizer = tokenizer
        self.config = config
        self.context: TrainerContext | None = None

    def setup(self, context: TrainerContext) -> None:
        """Called once the strategy has placed the model, before training or restoring a checkpoint."""
        self.context = context

    @property
    def options(self) -> dict[str, Any]:
        """The values of this trainer's own options (available from :meth:`setup` on)."""
        return self.context.options if self.context is not None else {}

    # -- data units --------------------------------------------------------------------------
    @abstractmethod
    def prepare(self, example: Example) -> Any:
        """Tokenize one example into a data unit; raise :class:`tunesmith.errors.DataError` naming ``example.where`` if it does not fit.

        A unit's ``len()`` is the number of tokens it takes in a row (what packing fits).
        """

    def truncate(self, unit: Sample, max_length: int) -> Sample:
        """``unit`` cut to ``max_length`` tokens (called only when it is longer); the default keeps a sample's start."""
        return Sample(unit.input_ids[:max_length], unit.labels[:max_length], unit.columns)

    def has_targets(self, unit: Sample) -> bool:
        """Whether anything in ``unit`` is trained; units with nothing left are dropped and counted."""
        return unit.num_trained_tokens > 0

    def step_source(self, rows: list[list[Any]], plan: StepPlan) -> StepSource | None:
        """Where each optimizer step's rows come from, if not the dataset's rows in the loop's seeded order.

        ``rows`` are the prepared data rows, ``plan`` the step's shape. A trainer that makes its
        rows with the model (rollouts) returns its own :class:`~tunesmith.steps.StepSource`;
        ``None`` (the default) trains on ``rows`` themselves.
        """
        return None

    # -- batches -----------------------------------------------------------------------------
    @abstractmethod
    def collate(self, rows: list[list[Any]]) -> dict[str, Any]:
        """Build one batch from rows; each row holds one unit, or several when packed."""

    @abstractmethod
    def count_items(self, batch: dict[str, Any]) -> int:
        """How many items (target tokens, pairs ...) the batch's loss is summed over."""

    def count_input_tokens(self, batch: dict[str, Any]) -> int:
        """Tokens the model reads for this batch, padding excluded (``num_tokens`` and tokens per second)."""
        return int(batch["num_input_tokens"])

    @abstractmethod
    def compute_loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> LossOutput:
        """The batch's loss summed over its items, computed with ``model``."""

    # -- state across a resume ---------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """What the trainer must keep across a resume (tensors and plain values); saved in every checkpoint."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take back what :meth:`state_dict` returned, when resuming from a checkpoint."""
