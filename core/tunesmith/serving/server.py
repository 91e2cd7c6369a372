"""The HTTP routes of ``tunesmith serve``, shaped like OpenAI's API.

``POST /v1/chat/completions`` and ``POST /v1/completions`` queue a request with the
serving engine (:class:`~tunesmith.serving.engine.ServingEngine`) and answer with the whole reply, or stream it as
server-sent events ending in ``data: [DONE]``. ``GET /v1/models`` lists the base model and its
adapters (a request's ``model`` picks one); ``GET /health`` answers without a key. With an API
key set, every other route needs ``Authorization: Bearer KEY``. Every failure is answered with
OpenAI's ``{"error": {"message", "type", "param", "code"}}`` body.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tunesmith.generation import GenerationOptions, prompt_ids
from tunesmith.serving.engine import ChoicePiece, Job, QueueFull, ServingEngine
from tunesmith.serving.errors import APIError
from tunesmith.serving.requests import GenerationRequest, parse_body, parse_chat_request, parse_completion_request


@dataclass(frozen=True)
class ServerSettings:
    """What the routes need besides the engine.

    ``base_model`` is the name a request gives for the base model alone; each of ``adapters``
    is also a model name. ``context_length`` (None: unknown) bounds prompt plus reply;
    ``default_max_tokens`` is the reply's length limit when a request sets none.
    """

    base_model: str
    adapters: tuple[str, ...]
    api_key: str | None
    max_body_bytes: int
    context_length: int | None
    default_max_tokens: int


def create_app(engine: ServingEngine, settings: ServerSettings) -> Starlette:
    """The ASGI application serving ``engine``'s model."""
    routes = _Routes(engine, settings)
    return Starlette(
        routes=[
            Route("/health", routes.health, methods=["GET"]),
            Route("/v1/models", routes.models, methods=["GET"]),
            Route("/v1/chat/completions", routes.chat_completions, methods=["POST"]),
            Route("/v1/completions", routes.completions, methods=["POST"]),
        ],
        exception_handlers={APIError: _api_error, HTTPException: _http_error, Exception: _unexpected_error},
    )


async def _api_error(request: Request, error: APIError) -> Response:
    return JSONResponse(error.body(), status_code=error.status)


async def _http_error(request: Request, error: HTTPException) -> Response:
    message = f"{request.method} {request.url.path}: {error.detail}; routes: /v1/chat/completions, /v1/completions, /v1/models, /health"
    return JSONResponse(APIError(error.status_code, message).body(), status_code=error.status_code)


async def _unexpected_error(request: Request, error: Exception) -> Response:
    return JSONResponse(APIError(500, f"the server failed: {error!r}", type="server_error").body(), status_code=500)


class _Routes:
    def __init__(self, engine: ServingEngine, settings: ServerSettings):
        self.engine = engine
        self.settings = settings
        self.created = int(time.time())

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def models(self, request: Request) -> Response:
        self._authorize(request)
        names = (self.settings.base_model, *self.settings.adapters)
        data = [{"id": name, "object": "model", "created": self.created, "owned_by": "tunesmith"} for name in names]
        return JSONResponse({"object": "list", "data": data})

    async def chat_completions(self, request: Request) -> Response:
        self._authorize(request)
        parsed = parse_chat_request(parse_body(await self._body(request)), self.engine.max_batch_rows)
        return await self._generate(parsed, prompt_ids(self.engine.tokenizer, list(parsed.messages)))

    async def completions(self, request: Request) -> Response:
        self._authorize(request)
        parsed = parse_completion_request(parse_body(await self._body(request)), self.engine.max_batch_rows)
        return await self._generate(parsed, list(self.engine.tokenizer(parsed.prompt)["input_ids"]))

    def _authorize(self, request: Request) -> None:
        key = self.settings.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise APIError(
                401, "missing or wrong API key: send the server's key as 'Authorization: Bearer KEY'", code="invalid_api_key"
            )

    async def _body(self, request: Request) -> bytes:
        limit = self.settings.max_body_bytes
        declared = request.headers.get("content-length", "")
        too_large = APIError(413, f"the request body is larger than {limit} bytes (--max-body-bytes)", code="body_too_large")
        if declared.isdigit() and int(declared) > limit:
            raise too_large
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise too_large
        return bytes(body)

    async def _generate(self, parsed: GenerationRequest, ids: list[int]) -> Response:
        adapter = self._adapter(parsed.model)
        where = "messages" if parsed.chat else "prompt"
        options = GenerationOptions(
            max_new_tokens=self._max_tokens(len(ids), parsed.max_tokens, where),
            temperature=parsed.temperature,
            top_p=parsed.top_p,
            seed=parsed.seed,
        )
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def deliver(item) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the event loop has closed: the server is shutting down and nobody waits
                pass

        job = Job(ids, options, n=parsed.n, stop=parsed.stop, adapter=adapter, deliver=deliver)
        try:
            self.engine.submit(job)
        except QueueFull as full:
            raise APIError(429, f"the server is busy: {full}; retry later", type="rate_limit_error", code="queue_full") from None
        reply = _Reply(parsed, len(ids), self.engine.tokenizer)
        if parsed.stream:
            return StreamingResponse(self._events(job, queue, reply), media_type="text/event-stream")
        finished = False
        try:
            while (item := await queue.get()) is not None:
                reply.add(_pieces(item))
            finished = True
        finally:
            if not finished:
                self.engine.cancel(job)
        return JSONResponse(reply.whole())

    async def _events(self, job: Job, queue: asyncio.Queue, reply: _Reply) -> AsyncIterator[str]:
        finished = False
        try:
            if reply.request.chat:
                for index in range(reply.request.n):
                    yield _event(reply.chunk(index, {"role": "assistant", "content": ""}, None, None))
            while (item := await queue.get()) is not None:
                try:
                    pieces = _pieces(item)
                except APIError as error:
                    yield _event(error.body())
                    break
                for piece in pieces:
                    reply.add([piece])
                    # A piece held back while a stop string may be starting says nothing yet.
                    if piece.text or piece.finish_reason or reply.request.logprobs:
                        yield _event(reply.piece_chunk(piece))
            else:
                if reply.request.include_usage:
                    yield _event(reply.usage_chunk())
            yield "data: [DONE]\n\n"
            finished = True
        finally:
            if not finished:  # the client went away: its rows stop at the next decode step
                self.engine.cancel(job)

    def _adapter(self, model: str) -> str | None:
        if model == self.settings.base_model:
            return None
        if model in self.settings.adapters:
            return model
        served = ", ".join((self.settings.base_model, *self.settings.adapters))
        raise APIError(404, f"model {model!r} is not served here; served models: {served}", param="model", code="model_not_found")

    def _max_tokens(self, prompt_tokens: int, requested: int | None, where: str) -> int:
        context = self.settings.context_length
        if context is None:
            return requested or self.settings.default_max_tokens
        if prompt_tokens >= context:
            raise APIError(
                400,
                f"{where}: the prompt is {prompt_tokens} tokens, but the model's context holds {context}; shorten it",
                param=where,
                code="context_length_exceeded",
            )
        if requested is not None and prompt_tokens + requested > context:
            raise APIError(
                400,
                f"max_tokens: {requested} tokens after a prompt of {prompt_tokens} exceed the model's context of {context}; "
                f"ask for at most {context - prompt_tokens}",
                param="max_tokens",
                code="context_length_exceeded",
            )
        return requested or min(self.settings.default_max_tokens, context - prompt_tokens)


def _pieces(item: list[ChoicePiece] | BaseException) -> list[ChoicePiece]:
    if isinstance(item, BaseException):
        raise APIError(500, f"generation failed: {item!r}", type="server_error")
    return item


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


class _Reply:
    """A reply's choices as they grow, and the JSON OpenAI's API gives them."""

    def __init__(self, request: GenerationRequest, prompt_tokens: int, tokenizer):
        self.request = request
        self.prompt_tokens = prompt_tokens
        self.tokenizer = tokenizer
        self.id = f"{'chatcmpl' if request.chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.texts = [""] * request.n
        self.token_ids: list[list[int]] = [[] for _ in range(request.n)]
        self.logprobs: list[list[float]] = [[] for _ in range(request.n)]
        self.finish_reasons: list[str | None] = [None] * request.n

    def add(self, pieces: list[ChoicePiece]) -> None:
        for piece in pieces:
            self.texts[piece.index] += piece.text
            self.token_ids[piece.index] += piece.token_ids
            self.logprobs[piece.index] += piece.logprobs
            self.finish_reasons[piece.index] = piece.finish_reason

    def whole(self) -> dict:
        choices = []
        for index in range(self.request.n):
            logprobs = self._logprobs(self.token_ids[index], self.logprobs[index])
            if self.request.chat:
                content = {"message": {"role": "assistant", "content": self.texts[index]}}
            else:
                content = {"text": self.texts[index]}
            choices.append({"index": index, **content, "logprobs": logprobs, "finish_reason": self.finish_reasons[index]})
        return {**self._header(""), "choices": choices, "usage": self._usage()}

    def piece_chunk(self, piece: ChoicePiece) -> dict:
        logprobs = self._logprobs(list(piece.token_ids), list(piece.logprobs))
        return self.chunk(piece.index, {"content": piece.text}, logprobs, piece.finish_reason)

    def chunk(self, index: int, delta: dict, logprobs: dict | None, finish_reason: str | None) -> dict:
        choice = {"delta": delta} if self.request.chat else {"text": delta["content"]}
        return {**self._header(".chunk"), "choices": [{"index": index, **choice, "logprobs": logprobs, "finish_reason": finish_reason}]}

    def usage_chunk(self) -> dict:
        return {**self._header(".chunk"), "choices": [], "usage": self._usage()}

    def _header(self, suffix: str) -> dict:
        kind = "chat.completion" + suffix if self.request.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.request.model}

    def _usage(self) -> dict:
        completion_tokens = sum(len(ids) for ids in self.token_ids)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": self.prompt_tokens + completion_tokens}

    def _logprobs(self, token_ids: list[int], logprobs: list[float]) -> dict | None:
        if not self.request.logprobs:
            return None
        tokens = [self.tokenizer.decode([token]) for token in token_ids]
        if not self.request.chat:
            return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": None}
        return {
            "content": [
                {"token": token, "logprob": logprob, "bytes": list(token.encode()), "top_logprobs": []}
                for token, logprob in zip(tokens, logprobs)
            ]
        }
