"""A ``/v1/chat/completions`` or ``/v1/completions`` body, checked field by field.

Every field is checked for its type and range before anything is queued, and the first bad one
is answered with a 400 naming it. Fields a client may send but that change nothing here
(``user``, ``metadata``, ``store``) are accepted and ignored; any other unknown field is
refused, so that a misspelled option is not silently dropped. What is supported:

- ``max_tokens`` (chat also ``max_completion_tokens``), ``temperature`` (0 to 2, 0 greedy),
  ``top_p`` (above 0, up to 1), ``n``, ``stop`` (a string or up to 4), ``seed`` (the same
  seed, prompt and options give the same reply), ``stream`` with ``stream_options.include_usage``;
- ``logprobs``: the log-probability of each chosen token only; asking for alternatives
  (``top_logprobs`` above 0, or ``logprobs`` above 0 on ``/v1/completions``) is refused;
- ``frequency_penalty`` and ``presence_penalty`` only at 0, ``best_of`` only 1, ``echo`` only false.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from tunesmith.serving.errors import APIError, invalid

ROLES = ("system", "user", "assistant")
MAX_STOP_STRINGS = 4
IGNORED_FIELDS = frozenset({"user", "metadata", "store"})
CHAT_FIELDS = frozenset(
    {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "stop", "seed", "logprobs",
     "top_logprobs", "stream", "stream_options", "frequency_penalty", "presence_penalty"}
)
COMPLETION_FIELDS = frozenset(
    {"model", "prompt", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "logprobs", "stream", "stream_options",
     "frequency_penalty", "presence_penalty", "best_of", "echo"}
)


@dataclass(frozen=True)
class GenerationRequest:
    """A checked request: a chat (``messages``) or a plain-text ``prompt`` to continue.

    ``max_tokens`` None means as many as the server's default allows.
    """

    model: str
    messages: tuple[dict[str, str], ...] | None
    prompt: str | None
    max_tokens: int | None
    temperature: float
    top_p: float
    n: int
    stop: tuple[str, ...]
    seed: int | None
    logprobs: bool
    stream: bool
    include_usage: bool

    @property
    def chat(self) -> bool:
        return self.messages is not None


def parse_body(body: bytes) -> dict:
    """The JSON object in ``body``, or a 400 saying why it is not one."""
    try:
        value = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise APIError(400, f"the request body is not valid JSON ({error}); send a JSON object", code="invalid_json") from None
    if not isinstance(value, dict):
        raise APIError(400, f"the request body is a JSON {type(value).__name__}; send a JSON object", code="invalid_json")
    return value


def parse_chat_request(body: dict, max_n: int) -> GenerationRequest:
    """A ``/v1/chat/completions`` body checked; ``max_n`` is the most choices one request may ask for."""
    _refuse_unknown(body, CHAT_FIELDS)
    max_tokens = _integer(body, "max_completion_tokens", 1)
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens", 1)
    logprobs = _boolean(body, "logprobs", False)
    if _integer(body, "top_logprobs", 0, 20):
        raise invalid("top_logprobs", "alternatives to the chosen token are not served; send 0 or leave it out")
    return _request(body, max_n, messages=_messages(body), prompt=None, max_tokens=max_tokens, logprobs=logprobs)


def parse_completion_request(body: dict, max_n: int) -> GenerationRequest:
    """A ``/v1/completions`` body checked; ``max_n`` is the most choices one request may ask for."""
    _refuse_unknown(body, COMPLETION_FIELDS)
    logprobs = _integer(body, "logprobs", 0, 5)
    if logprobs:
        raise invalid("logprobs", "alternatives to the chosen token are not served; send 0 for the chosen tokens' logprobs")
    _integer(body, "best_of", 1, 1)
    if _boolean(body, "echo", False):
        raise invalid("echo", "echoing the prompt is not supported; send false")
    return _request(body, max_n, messages=None, prompt=_prompt(body), max_tokens=_integer(body, "max_tokens", 1), logprobs=logprobs is not None)


def _request(body: dict, max_n: int, **fields) -> GenerationRequest:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("model", "required: the name of a served model (GET /v1/models lists them)")
    for penalty in ("frequency_penalty", "presence_penalty"):
        if _number(body, penalty, -2.0, 2.0):
            raise invalid(penalty, "penalties are not supported; send 0 or leave it out")
    stream = _boolean(body, "stream", False)
    options = body.get("stream_options")
    if options is not None and (not stream or not isinstance(options, dict) or set(options) - {"include_usage"}):
        raise invalid("stream_options", 'expected {"include_usage": true|false}, with "stream": true')
    include_usage = bool(options and _boolean(options, "include_usage", False))
    temperature = _number(body, "temperature", 0.0, 2.0)
    top_p = _number(body, "top_p", 0.0, 1.0)
    if top_p == 0:
        raise invalid("top_p", "expected a number above 0 and at most 1")
    n = _integer(body, "n", 1, max_n)
    return GenerationRequest(
        model=model,
        temperature=1.0 if temperature is None else float(temperature),
        top_p=1.0 if top_p is None else float(top_p),
        n=1 if n is None else n,
        stop=_stop(body),
        seed=_integer(body, "seed", -(2**63), 2**64 - 1),
        stream=stream,
        include_usage=include_usage,
        **fields,
    )


def _refuse_unknown(body: dict, known: frozenset[str]) -> None:
    unknown = sorted(set(body) - known - IGNORED_FIELDS)
    if unknown:
        raise invalid(unknown[0], f"unknown or unsupported field; supported: {', '.join(sorted(known))}")


def _integer(body: dict, name: str, low: int, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        expected = f"an integer from {low} to {high}" if high is not None else f"an integer, at least {low}"
        raise invalid(name, f"{value!r}: expected {expected}")
    return value


def _number(body: dict, name: str, low: float, high: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise invalid(name, f"{value!r}: expected a number from {low:g} to {high:g}")
    return float(value)


def _boolean(body: dict, name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise invalid(name, f"{value!r}: expected true or false")
    return value


def _stop(body: dict) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    strings = [value] if isinstance(value, str) else value
    if not isinstance(strings, list) or not 0 < len(strings) <= MAX_STOP_STRINGS or any(not isinstance(s, str) or not s for s in strings):
        raise invalid("stop", f"{value!r}: expected a non-empty string or a list of 1 to {MAX_STOP_STRINGS} non-empty strings")
    return tuple(strings)


def _messages(body: dict) -> tuple[dict[str, str], ...]:
    value = body.get("messages")
    if not isinstance(value, list) or not value:
        raise invalid("messages", 'required: a non-empty list of {"role": "system"|"user"|"assistant", "content": "..."}')
    messages = []
    for index, message in enumerate(value):
        where = f"messages[{index}]"
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise invalid(where, f'{message!r}: expected {{"role": one of {", ".join(ROLES)}, "content": "..."}}')
        messages.append({"role": message["role"], "content": _content(message.get("content"), where)})
    return tuple(messages)


def _content(content, where: str) -> str:
    """A message's text: a string, or a list of ``{"type": "text", "text": ...}`` parts joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
        return "".join(part["text"] for part in content)
    raise invalid(f"{where}.content", f'{content!r}: expected a string or a list of {{"type": "text", "text": "..."}} parts')


def _prompt(body: dict) -> str:
    value = body.get("prompt")
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if not isinstance(value, str) or not value:
        raise invalid("prompt", "required: one non-empty string to continue (a list of several prompts is not supported)")
    return value
