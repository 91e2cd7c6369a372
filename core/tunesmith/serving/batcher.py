"""Continuous batching: one thread owns the model and decodes every request it can fit, step by step.

Requests wait in a bounded queue. Whenever the model is free, the worker thread takes the
oldest waiting request and every other waiting request for the same adapter (up to
``max_batch_rows`` choices in all) and decodes them together in a
:class:`tunesmith.decoding.DecodeBatch`: concurrent requests share each forward pass instead of
taking turns. Between two decode steps, a request whose choices have all ended leaves the batch
and frees its rows, and waiting requests for the same adapter join (their prompts prefilled,
then decoded beside the running rows), so no row idles while the longest reply finishes. A
batch runs with one adapter active: requests for another adapter wait, and while one does, the
running batch takes nobody new, so it ends and the other adapter has its turn. Each request
samples from its own generator, seeded from its ``seed`` when it has one, so its reply does not
depend on what it was batched with; the global RNG is never used.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from tunesmith.decoding import STOP, DecodeBatch, Row, generation_mode
from tunesmith.generation import pad_token_id, stop_token_ids
from tunesmith.serving.choice_text import ChoiceText
from tunesmith.serving.engine import CANCELLED, ChoicePiece, Job, ServingEngine, WaitingJobs

if TYPE_CHECKING:
    from tunesmith.runtime import Runtime

#: how many past batches :attr:`Batcher.recent_batches` keeps
RECENT_BATCHES = 256


@dataclass(frozen=True)
class BatchRecord:
    """One batch the worker ran, from its first requests until its last row ended: the adapter
    (None for the base model), how many requests and choices joined it in all, the most rows it
    held at once, how many decode steps it took, and how many steps it had taken when each
    request joined (0 for those it started with), in the order they joined."""

    adapter: str | None
    requests: int
    rows: int
    most_rows: int
    steps: int
    joined_at_step: tuple[int, ...]


class Batcher(ServingEngine):
    """The ``transformers`` serving engine: the worker thread, its queue, and the model it owns.

    ``model`` is a causal LM, or a peft model holding every adapter in ``adapters`` (a request
    names one, or None for the base model). Nothing else may use the model while the worker
    runs, except inside :meth:`paused`.
    """

    @classmethod
    def load(
        cls, model: str, adapters: dict[str, Path], runtime: Runtime, *, max_queue: int, max_batch_rows: int, trust_remote_code: bool
    ) -> Batcher:
        from tunesmith.adapters import load_named_adapters
        from tunesmith.models import load_for_inference

        loaded, tokenizer = load_for_inference(model, runtime, None, trust_remote_code)
        if adapters:
            loaded = load_named_adapters(loaded, adapters)
        return cls(loaded, tokenizer, adapters=tuple(adapters), max_queue=max_queue, max_batch_rows=max_batch_rows)

    def __init__(self, model, tokenizer, *, adapters: Sequence[str] = (), max_queue: int, max_batch_rows: int):
        self.model = model
        self.tokenizer = tokenizer
        self.context_length = getattr(model.config, "max_position_embeddings", None)
        self.adapters = tuple(adapters)
        self.max_batch_rows = max_batch_rows
        self.recent_batches: deque[BatchRecord] = deque(maxlen=RECENT_BATCHES)
        self._waiting = WaitingJobs(max_queue)
        self._condition = threading.Condition()
        self._pauses = 0
        self._running = False
        self._closed = False
        self._pad_token_id = pad_token_id(tokenizer)
        self._stop_token_ids = stop_token_ids(model, tokenizer)
        self._device = next(model.parameters()).device
        self._thread = threading.Thread(target=self._work, name="tunesmith-batcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """Stop after the batch in progress, which takes nobody new; requests still waiting are never answered."""
        with self._condition:
            self._closed = True
            self._condition.notify_all()
        if self._thread.is_alive():
            self._thread.join()

    @property
    def waiting(self) -> int:
        """How many requests are queued and not yet in a batch."""
        with self._condition:
            return len(self._waiting)

    def submit(self, job: Job) -> None:
        """Queue ``job``; :class:`QueueFull` when ``max_queue`` requests already wait."""
        with self._condition:
            self._waiting.add(job)
            self._condition.notify_all()

    def cancel(self, job: Job) -> None:
        """Drop ``job``: out of the queue if it still waits, else its rows stop at the next step."""
        job.cancelled.set()
        with self._condition:
            self._waiting.discard(job)

    @contextmanager
    def paused(self) -> Iterator[None]:
        """No batch runs inside: the batch in progress takes nobody new and finishes first, and
        new requests wait in the queue (counting toward ``max_queue``) until the pause ends, when
        the worker takes them together. Lets a caller use the model itself, or line requests up
        for one batch."""
        with self._condition:
            self._pauses += 1
            self._condition.wait_for(lambda: not self._running)
        try:
            yield
        finally:
            with self._condition:
                self._pauses -= 1
                self._condition.notify_all()

    def _work(self) -> None:
        while True:
            with self._condition:
                self._condition.wait_for(lambda: self._closed or (self._waiting and not self._pauses))
                if self._closed:
                    return
                adapter = self._waiting.next_adapter
                jobs = self._waiting.take(adapter, self.max_batch_rows)
                self._running = True
            members: list[_Member] = []
            try:
                self._run_batch(adapter, jobs, members)
            except Exception as error:  # the batch fails; the server goes on serving
                for member in members:
                    member.job.deliver(error)
            finally:
                with self._condition:
                    self._running = False
                    self._condition.notify_all()

    def _joining(self, adapter: str | None, rows: int) -> list[Job]:
        """The waiting jobs that join a batch running ``adapter`` with ``rows`` rows: none while a
        pause or close is pending or a job for another adapter waits, so that the batch ends."""
        with self._condition:
            if self._pauses or self._closed or self._waiting.another_adapter_waits(adapter):
                return []
            return self._waiting.take(adapter, self.max_batch_rows - rows)

    def _run_batch(self, adapter: str | None, jobs: list[Job], members: list[_Member]) -> None:
        """Decode ``jobs``, and every job that joins them, until the last row ends. ``members``
        holds the jobs in the batch, for the caller to tell if it fails."""
        steps = rows = most_rows = 0
        joined_at_step: list[int] = []
        with self._adapter(adapter), generation_mode(self.model):
            batch = DecodeBatch(self.model, pad_token_id=self._pad_token_id, stop_token_ids=self._stop_token_ids)
            while jobs or members:
                if jobs:
                    self._join(batch, jobs, members)
                    joined_at_step += [steps] * len(jobs)
                    rows += sum(job.n for job in jobs)
                    most_rows = max(most_rows, len(batch.rows))
                batch.step()
                steps += 1
                for member in members:
                    self._advance(member)
                # A request's rows leave together, when its last one ends: until then its finished
                # choices stay as padding, so that its n choices draw from its generator as alone.
                finished = [member for member in members if member.finished]
                batch.drop([row for member in finished for row in member.rows])
                members[:] = [member for member in members if not member.finished]
                jobs = self._joining(adapter, len(batch.rows)) if members and batch.joinable else []
        self.recent_batches.append(BatchRecord(adapter, len(joined_at_step), rows, most_rows, steps, tuple(joined_at_step)))

    def _join(self, batch: DecodeBatch, jobs: list[Job], members: list[_Member]) -> None:
        """Prefill ``jobs`` into ``batch``, each with its own generator, and add them to ``members``."""
        generators = []
        for job in jobs:
            generator = torch.Generator(device=self._device)
            if job.options.seed is not None:
                generator.manual_seed(job.options.seed)
            else:
                generator.seed()
            generators.append(generator)
        joining = [_Member(job, [_Choice(ChoiceText(self.tokenizer, job.stop)) for _ in range(job.n)]) for job in jobs]
        members += joining
        rows = batch.add([job.prompt_ids for job in jobs], [job.options for job in jobs], generators, [job.n for job in jobs])
        start = 0
        for member in joining:
            member.rows = rows[start : start + member.job.n]
            start += member.job.n

    def _advance(self, member: _Member) -> None:
        """Send a job what its rows gained this step; end its rows when it was cancelled or hit a stop string."""
        job, choices, rows = member.job, member.choices, member.rows
        if job.cancelled.is_set():
            for row, choice in zip(rows, choices):
                row.finish_reason = row.finish_reason or CANCELLED
                choice.reported_finish = True
            return
        pieces = []
        for index, (row, choice) in enumerate(zip(rows, choices)):
            if choice.reported_finish:
                continue
            text, stopped = choice.text.advance(row.token_ids, row.finish_reason is not None)
            if stopped and row.finish_reason is None:
                row.finish_reason = STOP
            new = slice(choice.tokens_sent, len(row.token_ids))
            pieces.append(ChoicePiece(index, text, tuple(row.token_ids[new]), tuple(row.logprobs[new]), row.finish_reason))
            choice.tokens_sent = len(row.token_ids)
            choice.reported_finish = row.finish_reason is not None
        job.deliver(pieces)
        if member.finished:
            job.deliver(None)

    def _adapter(self, name: str | None):
        """The context in which the model runs as adapter ``name`` (None: the base model alone)."""
        if not self.adapters:
            return nullcontext()
        if name is None:
            return self.model.disable_adapter()
        self.model.set_adapter(name)
        return nullcontext()


class _Member:
    """A job in the running batch: what has been sent of each of its choices, and their rows."""

    def __init__(self, job: Job, choices: list[_Choice]):
        self.job = job
        self.choices = choices
        self.rows: list[Row] = []

    @property
    def finished(self) -> bool:
        return all(choice.reported_finish for choice in self.choices)


class _Choice:
    """What has been sent of one choice so far."""

    def __init__(self, text: ChoiceText):
        self.text = text
        self.tokens_sent = 0
        self.reported_finish = False
