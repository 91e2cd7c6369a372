"""Serving engines: what generates the replies of ``tunesmith serve``, chosen with ``--engine``.

The server turns each request into a :class:`Job` and hands it to the engine, which calls the
job's ``deliver`` with the :class:`ChoicePiece` its choices gain, step by step. The built-in
``transformers`` engine (:class:`tunesmith.serving.batcher.Batcher`) batches requests
continuously on every device; a plugin may register another (vLLM on CUDA) with
``tunesmith_register_serving_engines``.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tunesmith.generation import GenerationOptions
    from tunesmith.plugins import PluginManager
    from tunesmith.runtime import Runtime

#: the engine ``tunesmith serve`` uses unless told otherwise; it runs on every device
DEFAULT_SERVING_ENGINE = "transformers"
#: the finish reason of a choice whose request went away (a client that disconnected)
CANCELLED = "cancelled"


@dataclass(frozen=True)
class ChoicePiece:
    """What one choice of a request gained in one decode step.

    ``text`` is what may be sent now (possibly empty while a stop string might be starting);
    ``token_ids`` and ``logprobs`` are the step's new tokens and their log-probabilities;
    ``finish_reason`` is set on the choice's last piece: ``"stop"`` or ``"length"``.
    """

    index: int
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    finish_reason: str | None


class QueueFull(Exception):
    """The queue already holds ``max_queue`` waiting requests."""


class Job:
    """One request's generation: ``n`` choices continuing ``prompt_ids``.

    ``deliver`` is called from the worker thread: with a list of :class:`ChoicePiece` after each
    step in which choices changed, with ``None`` once every choice has finished, or with the
    exception that ended the batch.
    """

    def __init__(
        self,
        prompt_ids: Sequence[int],
        options: GenerationOptions,
        *,
        n: int,
        stop: Sequence[str],
        adapter: str | None,
        deliver: Callable[[list[ChoicePiece] | BaseException | None], None],
    ):
        self.prompt_ids = list(prompt_ids)
        self.options = options
        self.n = n
        self.stop = tuple(stop)
        self.adapter = adapter
        self.deliver = deliver
        self.cancelled = threading.Event()


class WaitingJobs:
    """The jobs an engine was given and has not started, oldest first, at most ``max_queue``.

    Engines that run one adapter at a time take from it the jobs for the running adapter that
    fit in their free rows (:meth:`take`), and take nobody new while a job for another adapter
    waits (:meth:`another_adapter_waits`), so that the running jobs end and that adapter has its
    turn. Not locked: an engine calls it under its own lock.
    """

    def __init__(self, max_queue: int):
        self.max_queue = max_queue
        self._jobs: deque[Job] = deque()

    def __len__(self) -> int:
        return len(self._jobs)

    def add(self, job: Job) -> None:
        """Queue ``job``; :class:`QueueFull` when ``max_queue`` jobs already wait."""
        if len(self._jobs) >= self.max_queue:
            raise QueueFull(f"{len(self._jobs)} requests are already waiting (--max-queue {self.max_queue})")
        self._jobs.append(job)

    def discard(self, job: Job) -> bool:
        """Drop ``job`` if it waits; whether it did."""
        if job in self._jobs:
            self._jobs.remove(job)
            return True
        return False

    @property
    def next_adapter(self) -> str | None:
        """The adapter of the oldest waiting job (None: the base model); there must be one."""
        return self._jobs[0].adapter

    def another_adapter_waits(self, adapter: str | None) -> bool:
        return any(job.adapter != adapter for job in self._jobs)

    def take(self, adapter: str | None, free_rows: int) -> list[Job]:
        """The waiting jobs for ``adapter``, oldest first, as long as each one's ``n`` choices fit
        in ``free_rows``; the first that does not fit stops the taking, so that later, smaller
        ones do not starve it. They no longer wait."""
        jobs = []
        for job in [job for job in self._jobs if job.adapter == adapter]:
            if job.n > free_rows:
                break
            jobs.append(job)
            free_rows -= job.n
            self._jobs.remove(job)
        return jobs


class ServingEngine(ABC):
    """Generates the replies to the server's requests.

    Made by :meth:`load`; the server then calls :meth:`start` once, :meth:`submit` for each
    request and :meth:`cancel` when its client goes away (both from the server's event loop:
    they must not block), and :meth:`close` when it stops. A job's ``deliver`` may be called
    from any thread.
    """

    #: renders and counts the prompts (chat template, ``/v1/completions`` text)
    tokenizer: Any
    #: the most choices one request may ask for (its ``n``)
    max_batch_rows: int
    #: the most tokens of prompt and reply together, or None when unknown
    context_length: int | None = None

    @classmethod
    @abstractmethod
    def load(
        cls, model: str, adapters: dict[str, Path], runtime: Runtime, *, max_queue: int, max_batch_rows: int, trust_remote_code: bool
    ) -> ServingEngine:
        """The engine for ``model`` (a local folder, Hub ID or alias) and each of ``adapters``
        (a peft adapter folder by the model name requests give for it), on ``runtime``'s device
        and precision, queueing at most ``max_queue`` requests."""

    def start(self) -> None:
        """Begin generating for submitted jobs."""

    @abstractmethod
    def submit(self, job: Job) -> None:
        """Queue ``job`` for its adapter (``job.adapter``, None for the base model); raise
        :class:`QueueFull` when ``max_queue`` requests already wait."""

    @abstractmethod
    def cancel(self, job: Job) -> None:
        """Stop generating for ``job`` (waiting or running) and free what it held."""

    def close(self) -> None:
        """Stop; jobs still waiting are never answered."""


def serving_engine_class(manager: PluginManager, name: str, runtime: Runtime) -> type[ServingEngine]:
    """The class of the registered engine ``name``, checked to run on ``runtime``'s device.

    Fails, listing what would work, when no engine has that name or it does not run there; an
    import failure names the plugin that registered it.
    """
    return manager.load_class("serving engine", name, ServingEngine, runtime.device.name)
