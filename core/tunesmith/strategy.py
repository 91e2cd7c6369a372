"""The ``Strategy`` interface: how a model is placed, replicated or sharded across processes.

Shaped like Lightning Fabric's strategies. A strategy owns everything about a training step
that parallelism or precision changes: the process group, setting up model and optimizer
together, the model-init context, autocast and the gradient scaler, backward, gradient sync
during accumulation, clipping and the optimizer step, collectives, and checkpoint state. The
loop (:mod:`tunesmith.engine`) calls it; trainers never call ``backward`` or ``step``.

**The gradient contract.** The engine divides every micro-batch's summed loss by the item
count of the whole optimizer step over all data-parallel ranks. The gradient a step needs is
therefore the *sum* over ranks of each rank's gradient. A strategy whose engine averages
gradients across ranks (DDP, FSDP and DeepSpeed all do) declares ``gradient_reduction =
"mean"``, and the engine multiplies the loss by the data-parallel size before backward; one
that sums declares ``"sum"``. Either way the applied gradient equals one process training on
the whole global batch.

**Ranks.** ``rank``/``world_size`` count every process; ``dp_rank``/``dp_size`` count the
data-parallel replicas, which read disjoint rows. They are equal for pure data parallelism;
a strategy whose ranks share a batch (tensor parallel) reports a smaller ``dp_size``.

The built-in :class:`SingleDeviceStrategy` (``single``) runs in one process on one device;
:mod:`tunesmith.strategies` holds the multi-process ones.
"""

from __future__ import annotations

import contextlib
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping

import torch

from tunesmith.atomic import write_atomically
from tunesmith.checkpoint import LoadedCheckpoint, TrainingState, load_replicated, save_replicated
from tunesmith.device import Device
from tunesmith.launch import ProcessEnvironment

#: builds the optimizer for a model's trainable parameters
OptimizerFactory = Callable[[torch.nn.Module], torch.optim.Optimizer]


@dataclass(frozen=True)
class StepSettings:
    """How the loop will step, for strategies whose engine must be told at setup (DeepSpeed)."""

    micro_batch_size: int
    grad_accum: int
    max_grad_norm: float


@dataclass(frozen=True)
class StepOutcome:
    """What :meth:`Strategy.optimizer_step` did.

    ``grad_norm`` is the norm before clipping; ``applied`` whether the parameters were
    updated; ``loss_scale_overflow`` whether a skipped fp16 step only means the loss scale was
    too high (it has been lowered), which is no sign of a bad step.
    """

    grad_norm: float
    applied: bool
    loss_scale_overflow: bool = False


class Strategy(ABC):
    name: str = ""
    #: how the engine behind this strategy combines data-parallel gradients: "mean" or "sum"
    gradient_reduction: ClassVar[str] = "mean"
    #: what its checkpoints hold; a run resumes only a checkpoint of its own format
    checkpoint_format: ClassVar[str] = "replicated"
    #: whether the model may mix bf16 frozen weights with fp32 trained ones (a LoRA run in bf16 then loads
    #: its base in bf16); strategies that shard or flatten parameters into one buffer say no
    holds_frozen_weights_in_compute_dtype: ClassVar[bool] = False

    def __init__(
        self, device: Device, precision: str, environment: ProcessEnvironment | None = None, options: Mapping[str, Any] | None = None
    ):
        self.device = device
        self.precision = precision
        self.environment = environment or ProcessEnvironment.from_environ()
        #: values of the options declared on this strategy's :class:`~tunesmith.records.StrategySpec`
        self.options = dict(options or {})
        self.root_device: torch.device | None = None
        self.scaler = device.grad_scaler(precision)

    @classmethod
    def check_runnable(cls, device: Device, precision: str, options: Mapping[str, Any]) -> None:
        """Raise :class:`~tunesmith.errors.ConfigError` if this strategy cannot run with these choices.

        Called before any process starts (and before the model loads), so a combination that
        cannot work costs seconds: a precision or option the strategy does not support, a
        package it needs that is missing.
        """

    @classmethod
    def reshards_checkpoints(cls, options: Mapping[str, Any]) -> bool:
        """Whether a checkpoint written with these options resumes exactly on a different number of processes."""
        return True

    # -- where this process is -------------------------------------------------------------
    @property
    def rank(self) -> int:
        return self.environment.rank

    @property
    def world_size(self) -> int:
        return self.environment.world_size

    @property
    def local_rank(self) -> int:
        return self.environment.local_rank

    @property
    def dp_rank(self) -> int:
        return self.rank

    @property
    def dp_size(self) -> int:
        return self.world_size

    @property
    def is_global_zero(self) -> bool:
        return self.rank == 0

    # -- setup -----------------------------------------------------------------------------
    @abstractmethod
    def setup_environment(self) -> None:
        """Create the process group (if any) on the device's backend and set ``root_device``."""

    @contextlib.contextmanager
    def model_init_context(self):
        """The context the model is created in (before adapters are applied).

        It yields ``True`` when this process should create the model empty, on the meta
        device with no weights read, because :meth:`setup` fills it in (from the first
        process, for instance), and ``False`` when the process loads the weights itself (the
        default).
        """
        yield False

    @abstractmethod
    def setup(
        self, model: torch.nn.Module, make_optimizer: OptimizerFactory, settings: StepSettings
    ) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        """Move, wrap or shard the model and build its optimizer; return what the loop should use.

        The returned optimizer is the one the learning-rate scheduler drives.
        """

    # -- one step --------------------------------------------------------------------------
    def autocast(self):
        """The forward pass's mixed-precision context."""
        return self.device.autocast(self.precision)

    def no_sync(self, model: torch.nn.Module, enabled: bool):
        """Skip gradient synchronisation for accumulation micro-batches that are not the last."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, model: torch.nn.Module) -> None:
        self.scaler.scale(loss).backward()

    def optimizer_step(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, max_grad_norm: float, loss_is_finite: bool = True
    ) -> StepOutcome:
        """Unscale, clip (``max_grad_norm`` 0 measures without clipping), step unless anything is non-finite, zero the gradients.

        A non-finite loss or gradient norm leaves the parameters untouched; an fp16 overflow
        also lowers the loss scale.
        """
        self.scaler.unscale_(optimizer)
        grad_norm = float(self.clip_grad_norm(model, max_grad_norm))
        applied = loss_is_finite and math.isfinite(grad_norm)
        if applied:
            self.scaler.step(optimizer)
        self.scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return StepOutcome(grad_norm, applied, loss_scale_overflow=self.scaler.is_enabled() and loss_is_finite and not applied)

    def clip_grad_norm(self, model: torch.nn.Module, max_norm: float) -> torch.Tensor:
        """Clip gradients in place (``max_norm`` 0 measures without clipping); return the total norm."""
        parameters = [p for p in model.parameters() if p.grad is not None]
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm if max_norm > 0 else float("inf"))

    # -- collectives (on device tensors; identities in one process) --------------------------
    def reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Combine ``tensor`` over all processes with ``op`` (``sum``, ``mean``, ``max``, ``min``)."""
        return tensor.to(self.root_device)

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every process's ``tensor`` stacked along a new first dimension, in rank order."""
        return tensor.to(self.root_device).unsqueeze(0)

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Process ``src``'s ``tensor``, on every process."""
        return tensor.to(self.root_device)

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every process's picklable ``obj``, in rank order."""
        return [obj]

    def barrier(self) -> None:
        """Wait for every process."""

    # -- state -----------------------------------------------------------------------------
    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The plain module inside whatever wrapper ``setup`` added."""
        return model

    def place_frozen(self, model: torch.nn.Module) -> torch.nn.Module:
        """Place a model that is only ever run forward (a reference model) where this process computes."""
        return model.to(self.root_device)

    def write_atomically(self, target: Path, write_into: Callable[[Path], None]) -> None:
        """Write a folder that appears complete or not at all; every process calls this and may write into it."""
        write_atomically(target, write_into)

    def save_checkpoint(self, folder: Path, state: TrainingState) -> None:
        """Write a complete checkpoint atomically; every process calls this.

        The default suits strategies whose model and optimizer state are whole on every
        process: the first process writes them, every process its own RNG state.
        """

        def write(staging: Path) -> None:
            scaler_state = self.scaler.state_dict() if self.scaler.is_enabled() else None
            if self.is_global_zero:
                save_replicated(staging, state, self.unwrap(state.model), scaler_state)
            self.save_rng_state(staging)

        self.write_atomically(folder, write)

    def load_checkpoint(self, folder: Path, state: TrainingState) -> LoadedCheckpoint:
        """Restore weights, optimizer, scheduler and this process's RNG from ``folder``; every process calls this."""
        loaded = load_replicated(folder, state, self.unwrap(state.model))
        if loaded.scaler_state is not None:
            self.scaler.load_state_dict(loaded.scaler_state)
        self.load_rng_state(folder)
        return loaded

    def save_rng_state(self, folder: Path) -> None:
        """Write this process's random-generator states into a checkpoint folder."""
        torch.save(self.device.get_rng_state(), folder / f"rng_state-rank{self.rank}.pt")

    def load_rng_state(self, folder: Path) -> None:
        own = folder / f"rng_state-rank{self.rank}.pt"
        # A run resumed on more processes than it was saved with: the new ranks start from rank 0's generators.
        self.device.set_rng_state(torch.load(own if own.is_file() else folder / "rng_state-rank0.pt", weights_only=True))

    def save_final(self, folder: Path, model: torch.nn.Module, tokenizer) -> None:
        """Write the trained result (peft adapter or full model, plus tokenizer) atomically, unsharded."""
        unwrapped = self.unwrap(model)

        def write(staging: Path) -> None:
            if self.is_global_zero:
                unwrapped.save_pretrained(staging)
                tokenizer.save_pretrained(staging)

        self.write_atomically(folder, write)

    def teardown(self) -> None:
        """Release the process group and other resources (called even when training failed)."""


class SingleDeviceStrategy(Strategy):
    name = "single"
    holds_frozen_weights_in_compute_dtype = True

    def setup_environment(self) -> None:
        self.root_device = self.device.setup(self.local_rank)

    def setup(self, model, make_optimizer, settings):
        model = model.to(self.root_device)
        return model, make_optimizer(model)
