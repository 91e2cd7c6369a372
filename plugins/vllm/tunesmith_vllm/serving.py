"""``tunesmith serve --engine vllm``: the server's requests answered by a vLLM engine.

One worker thread owns a vLLM ``LLMEngine`` (its engine core in this process) and steps it while
any request runs; vLLM batches the running requests continuously and manages their KV cache in
pages. Requests wait in tunesmith's bounded queue until their choices fit in ``max_batch_rows``
rows, the engine's most concurrent sequences. Each choice is one vLLM request; a request's
``seed`` seeds its choice ``i`` with ``seed + i``, so a seeded reply does not depend on what it
was batched with. Named LoRA adapters are served through vLLM's LoRA support, one adapter at a
time, as the ``transformers`` engine does: while a request for another adapter (or the base
model) waits, no new request joins, and once the running ones end the waiting adapter has its
turn. (vLLM's CPU build, 0.32, answered the base model's requests with the adapter when both
ran in one batch.)
"""

from __future__ import annotations

import itertools
import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from tunesmith import ChoicePiece, Job, ServingEngine, WaitingJobs, resolve_model, stop_token_ids
from tunesmith_vllm.settings import device_settings, sampling_params

VLLM_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


class VLLMEngine(ServingEngine):
    @classmethod
    def load(
        cls, model: str, adapters: dict[str, Path], runtime: Any, *, max_queue: int, max_batch_rows: int, trust_remote_code: bool
    ) -> VLLMEngine:
        # The engine core runs in this process, stepped by the worker thread.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from transformers import AutoTokenizer, GenerationConfig
        from vllm import EngineArgs, LLMEngine

        folder = resolve_model(model)
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
        try:
            generation_config = GenerationConfig.from_pretrained(folder)
        except OSError:  # the folder has no generation_config.json
            generation_config = None
        lora: dict[str, Any] = {}
        if adapters:
            lora = {"enable_lora": True, "max_loras": len(adapters), "max_lora_rank": max(_lora_rank(path) for path in adapters.values())}
        engine = LLMEngine.from_engine_args(
            EngineArgs(
                model=str(folder),
                dtype=VLLM_DTYPES[runtime.precision],
                trust_remote_code=trust_remote_code,
                max_num_seqs=max_batch_rows,
                seed=0,
                **device_settings(runtime.device.name),
                **lora,
            )
        )
        stops = stop_token_ids(SimpleNamespace(generation_config=generation_config), tokenizer)
        return cls(engine, tokenizer, stops, adapters=adapters, max_queue=max_queue, max_batch_rows=max_batch_rows)

    def __init__(self, engine, tokenizer, stop_token_ids: list[int], *, adapters: dict[str, Path], max_queue: int, max_batch_rows: int):
        from vllm.lora.request import LoRARequest

        self.engine = engine
        self.tokenizer = tokenizer
        self.stop_token_ids = stop_token_ids
        self.context_length = engine.model_config.max_model_len
        self.max_batch_rows = max_batch_rows
        self.lora_requests = {name: LoRARequest(name, number, str(path)) for number, (name, path) in enumerate(adapters.items(), start=1)}
        self._waiting = WaitingJobs(max_queue)
        self._cancelled: list[Job] = []
        self._running: dict[str, _Running] = {}  # by vLLM request id
        self._rows = 0
        self._ids = itertools.count()
        self._condition = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="tunesmith-vllm", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        with self._condition:
            self._closed = True
            self._condition.notify_all()
        if self._thread.is_alive():
            self._thread.join()

    def submit(self, job: Job) -> None:
        with self._condition:
            self._waiting.add(job)
            self._condition.notify_all()

    def cancel(self, job: Job) -> None:
        job.cancelled.set()
        with self._condition:
            if not self._waiting.discard(job):
                self._cancelled.append(job)
            self._condition.notify_all()

    # -- the worker thread ----------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            with self._condition:
                self._condition.wait_for(lambda: self._closed or self._waiting or self._cancelled or self._running)
                if self._closed:
                    return
                joining = self._take()
                cancelled, self._cancelled = self._cancelled, []
            try:
                self._abort(cancelled)
                for job in joining:
                    self._add(job)
                if self._running:
                    self._step()
            except Exception as error:  # the running requests fail; the server goes on serving
                failed = self._running_jobs() | set(joining)
                self.engine.abort_request(list(self._running))
                self._running.clear()
                self._rows = 0
                for job in failed:
                    job.deliver(error)

    def _take(self) -> list[Job]:
        """The waiting jobs that join the running ones (:meth:`tunesmith.WaitingJobs.take`):
        those for the running adapter that fit in the free rows, none while another adapter waits."""
        running = {running.job.adapter for running in self._running.values()}
        if not self._waiting:
            return []
        if running:
            adapter = next(iter(running))  # one adapter at a time
            if self._waiting.another_adapter_waits(adapter):
                return []
        else:
            adapter = self._waiting.next_adapter
        jobs = self._waiting.take(adapter, self.max_batch_rows - self._rows)
        self._rows += sum(job.n for job in jobs)
        return jobs

    def _running_jobs(self) -> set[Job]:
        return {running.job for running in self._running.values()}

    def _add(self, job: Job) -> None:
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        running = _Running(job)
        options = job.options
        for index in range(job.n):
            request_id = f"{next(self._ids)}"
            seed = None if options.seed is None else options.seed + index
            params = sampling_params(
                options, seed=seed, stop=job.stop, stop_token_ids=self.stop_token_ids, logprobs=0, output_kind=RequestOutputKind.DELTA
            )
            lora = None if job.adapter is None else self.lora_requests[job.adapter]
            self.engine.add_request(request_id, TokensPrompt(prompt_token_ids=job.prompt_ids), params, lora_request=lora)
            running.choices[request_id] = index
            self._running[request_id] = running

    def _abort(self, jobs: list[Job]) -> None:
        ids = [request_id for request_id, running in self._running.items() if running.job in jobs]
        if ids:
            self.engine.abort_request(ids)
        self._finish_requests(ids)

    def _step(self) -> None:
        pieces: dict[Job, list[ChoicePiece]] = {}
        finished = []
        for output in self.engine.step():
            running = self._running.get(output.request_id)
            if running is None:
                continue
            choice = output.outputs[0]
            logprobs = tuple(next(iter(step.values())).logprob for step in choice.logprobs or ())
            reason = None if not output.finished else choice.finish_reason
            piece = ChoicePiece(running.choices[output.request_id], choice.text, tuple(choice.token_ids), logprobs, reason)
            pieces.setdefault(running.job, []).append(piece)
            if output.finished:
                finished.append(output.request_id)
        for job, delivered in pieces.items():
            if not job.cancelled.is_set():
                job.deliver(delivered)
        self._finish_requests(finished)

    def _finish_requests(self, request_ids: list[str]) -> None:
        """Forget the vLLM requests in ``request_ids``; a job whose choices have all ended is told so."""
        for request_id in request_ids:
            running = self._running.pop(request_id)
            del running.choices[request_id]
            if not running.choices:
                self._rows -= running.job.n
                if not running.job.cancelled.is_set():
                    running.job.deliver(None)
        with self._condition:
            self._condition.notify_all()


@dataclass(eq=False)
class _Running:
    """A job whose choices run in the engine: the choice index of each of its vLLM requests still running."""

    job: Job
    choices: dict[str, int] = field(default_factory=dict)


def _lora_rank(adapter: Path) -> int:
    """The rank vLLM reserves for ``adapter``: its LoRA rank, rounded up to a power of two of at
    least 8 (the ranks vLLM takes)."""
    rank = int(json.loads((Path(adapter) / "adapter_config.json").read_text(encoding="utf-8"))["r"])
    return max(8, 1 << (rank - 1).bit_length())
