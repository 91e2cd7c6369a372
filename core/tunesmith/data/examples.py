"""Turning raw records into :class:`Example` objects, whatever dataset format they come in.

A file's format is detected once, from the keys of its first row, among the formats the
trainer reads (:class:`RowFormat`; a trainer plugin may bring its own), and every row must then
be in that format. The conversation formats (``sft``, ``pt``):

- OpenAI ``messages``: ``[{"role": "system" | "user" | "assistant", "content": "..."}, ...]``
- ShareGPT ``conversations``: ``[{"from": "human" | "gpt" | "system", "value": "..."}, ...]``
  (``user`` and ``assistant`` are accepted for ``from`` as well)
- Alpaca ``instruction``, optional ``input``, ``output``, optional ``system``: becomes an
  optional system message, a user message (instruction and input joined by a newline) and an
  assistant message
- plain ``text``, for continued pre-training

The preference formats (``dpo`` and the other alignment trainers):

- ``prompt``, ``chosen``, ``rejected``: each a string or a list of messages (TRL's shape); a
  string prompt is one user message, a string response one assistant message
- ``messages`` ending in the chosen assistant reply, plus ``rejected_response`` (ms-swift's shape)
- ``prompt``, ``completion``, ``label`` (true for a desirable completion): unpaired, for KTO

Every field the format does not read is kept, untouched, in ``Example.columns``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunesmith.data.readers import BadRowError, OnBadRow, json_type, read_records
from tunesmith.data.types import Example
from tunesmith.errors import DataError

ROLES = ("system", "user", "assistant")
SHAREGPT_SPEAKERS = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class FieldError(Exception):
    """A problem with one field of a row; the caller adds the file and row."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")


@dataclass(frozen=True)
class RowFormat:
    name: str
    #: keys whose presence in a row identifies the format
    signature: tuple[str, ...]
    #: keys the format turns into the conversation or text; every other key becomes a column
    reads: tuple[str, ...]
    #: record -> the example's fields (``{"messages": [...]}``, ...); raises :class:`FieldError`
    convert: Callable[[dict[str, Any]], dict[str, Any]]

    def describe(self) -> str:
        return f"{self.name} ({' + '.join(repr(key) for key in self.signature)})"


def _string(mapping: dict[str, Any], key: str, name: str | None = None, *, optional: bool = False) -> str | None:
    """``mapping[key]``, which must be a string; ``name`` is the field's path for errors."""
    name = name or key
    value = mapping.get(key)
    if value is None and optional:
        return None
    if key not in mapping:
        raise FieldError(name, "missing")
    if not isinstance(value, str):
        raise FieldError(name, f"expected a string, got {json_type(value)}")
    return value


def _turns(record: dict[str, Any], field: str) -> list[Any]:
    turns = record[field]
    if isinstance(turns, str) and turns.lstrip().startswith("["):
        # Flat formats (CSV) can only hold the list of turns as JSON text.
        try:
            turns = json.loads(turns)
        except json.JSONDecodeError as error:
            raise FieldError(field, f"looks like a JSON list of turns but does not parse: {error}") from None
    if not isinstance(turns, list):
        raise FieldError(field, f"expected a list of turns, got {json_type(turns)}")
    if not turns:
        raise FieldError(field, "empty; expected at least one turn")
    return turns


def _messages(record: dict[str, Any], field: str) -> list[dict[str, str]]:
    messages = []
    for index, turn in enumerate(_turns(record, field)):
        where = f"{field}[{index}]"
        if not isinstance(turn, dict):
            raise FieldError(where, f"expected an object with 'role' and 'content', got {json_type(turn)}")
        role = _string(turn, "role", f"{where}.role")
        if role not in ROLES:
            raise FieldError(f"{where}.role", f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
        content = _string(turn, "content", f"{where}.content")
        messages.append({"role": role, "content": content})
    return messages


def _from_messages(record: dict[str, Any]) -> dict[str, Any]:
    return {"messages": _messages(record, "messages")}


def _from_sharegpt(record: dict[str, Any]) -> dict[str, Any]:
    messages = []
    for index, turn in enumerate(_turns(record, "conversations")):
        where = f"conversations[{index}]"
        if not isinstance(turn, dict):
            raise FieldError(where, f"expected an object with 'from' and 'value', got {json_type(turn)}")
        speaker = _string(turn, "from", f"{where}.from")
        value = _string(turn, "value", f"{where}.value")
        if speaker not in SHAREGPT_SPEAKERS:
            raise FieldError(f"{where}.from", f"unknown speaker {speaker!r}; expected one of {', '.join(SHAREGPT_SPEAKERS)}")
        messages.append({"role": SHAREGPT_SPEAKERS[speaker], "content": value})
    return {"messages": messages}


def _from_alpaca(record: dict[str, Any]) -> dict[str, Any]:
    instruction = _string(record, "instruction")
    extra_input = _string(record, "input", optional=True)
    output = _string(record, "output")
    system = _string(record, "system", optional=True)
    prompt = "\n".join(part for part in (instruction, extra_input) if part)
    if not prompt:
        raise FieldError("instruction", "empty, and there is no 'input' either; expected the prompt text")
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": prompt})
    messages.append({"role": "assistant", "content": output})
    return {"messages": messages}


def _from_text(record: dict[str, Any]) -> dict[str, Any]:
    text = _string(record, "text")
    if not text:
        raise FieldError("text", "empty; expected the text to train on")
    return {"text": text}


def _turns_or_string(record: dict[str, Any], field: str, role: str) -> list[dict[str, str]]:
    """A field holding a string (one ``role`` message) or a list of messages."""
    value = record.get(field)
    if isinstance(value, str) and not value.lstrip().startswith("["):
        if not value:
            raise FieldError(field, "empty; expected text or a list of messages")
        return [{"role": role, "content": value}]
    return _messages(record, field)


def _responses(record: dict[str, Any], *fields: str) -> list[list[dict[str, str]]]:
    responses = []
    for field in fields:
        turns = _turns_or_string(record, field, "assistant")
        if turns[-1]["role"] != "assistant":
            raise FieldError(field, f"expected the response to end with an assistant message, got {turns[-1]['role']!r}")
        responses.append(turns)
    return responses


def _prompt(record: dict[str, Any]) -> list[dict[str, str]]:
    prompt = _turns_or_string(record, "prompt", "user")
    if prompt[-1]["role"] == "assistant":
        raise FieldError("prompt", "ends with an assistant message; the prompt is what the responses answer")
    return prompt


def _from_preference(record: dict[str, Any]) -> dict[str, Any]:
    chosen, rejected = _responses(record, "chosen", "rejected")
    return {"prompt": _prompt(record), "chosen": chosen, "rejected": rejected}


def _from_messages_and_rejected(record: dict[str, Any]) -> dict[str, Any]:
    messages = _messages(record, "messages")
    if messages[-1]["role"] != "assistant" or len(messages) < 2:
        raise FieldError("messages", "expected a conversation ending in the chosen assistant reply")
    rejected = _string(record, "rejected_response")
    return {"prompt": messages[:-1], "chosen": [messages[-1]], "rejected": [{"role": "assistant", "content": rejected}]}


def _from_unpaired(record: dict[str, Any]) -> dict[str, Any]:
    label = record.get("label")
    if not isinstance(label, bool):
        raise FieldError("label", f"expected true (a desirable completion) or false, got {json_type(label)}")
    (completion,) = _responses(record, "completion")
    return {"prompt": _prompt(record), "completion": completion, "label": label}


def _from_prompt_only(record: dict[str, Any]) -> dict[str, Any]:
    raw = record.get("prompt")
    return {"prompt": _prompt(record), "conversational": not (isinstance(raw, str) and not raw.lstrip().startswith("["))}


# In detection order: a row with both 'messages' and 'text' is a conversation whose text is a column.
CONVERSATION_FORMATS = (
    RowFormat("OpenAI messages", ("messages",), ("messages",), _from_messages),
    RowFormat("ShareGPT", ("conversations",), ("conversations",), _from_sharegpt),
    RowFormat("Alpaca", ("instruction", "output"), ("instruction", "input", "output", "system"), _from_alpaca),
    RowFormat("plain text", ("text",), ("text",), _from_text),
)
#: pairs of responses to one prompt, the better one first
PAIRED_PREFERENCE_FORMATS = (
    RowFormat("preference pairs", ("prompt", "chosen", "rejected"), ("prompt", "chosen", "rejected"), _from_preference),
    RowFormat("messages with a rejected response", ("messages", "rejected_response"), ("messages", "rejected_response"), _from_messages_and_rejected),
)
#: single responses labelled desirable or not (KTO)
UNPAIRED_PREFERENCE_FORMATS = (
    RowFormat("labelled completions", ("prompt", "completion", "label"), ("prompt", "completion", "label"), _from_unpaired),
)
#: prompts alone, for trainers that generate the completions (GRPO); ``conversational`` says
#: whether the prompt was a list of messages (else one string, rendered as a user message)
PROMPT_FORMATS = (RowFormat("prompts", ("prompt",), ("prompt",), _from_prompt_only),)


def detect_format(record: dict[str, Any], where: str, formats: tuple[RowFormat, ...] = CONVERSATION_FORMATS) -> RowFormat:
    """The format among ``formats`` that ``record`` (a file's first row, at ``where``) is in."""
    for row_format in formats:
        if all(key in record for key in row_format.signature):
            return row_format
    found = ", ".join(repr(key) for key in record) or "none"
    expected = "; ".join(row_format.describe() for row_format in formats)
    raise DataError(f"{where}: the row matches no dataset format this trainer reads; its keys: {found}; expected one of: {expected}")


def to_example(record: dict[str, Any], row_format: RowFormat, source: str, row: int) -> Example:
    """Normalise one record; a malformed one raises :class:`BadRowError` naming ``source:row`` and the field."""
    for key in row_format.signature:
        if key not in record:
            raise BadRowError(
                f"{source}:{row}: {key}: missing; the file's first row is in {row_format.describe()} format, "
                "so every row needs it"
            )
    try:
        fields = row_format.convert(record)
    except FieldError as error:
        raise BadRowError(f"{source}:{row}: {error}") from None
    columns = {key: value for key, value in record.items() if key not in row_format.reads}
    return Example(source=source, row=row, fields=fields, columns=columns)


def read_examples(
    path: str | Path, on_bad_row: OnBadRow | None = None, formats: tuple[RowFormat, ...] = CONVERSATION_FORMATS
) -> Iterator[Example]:
    """Yield every row of ``path`` as an :class:`Example`.

    A malformed row raises :class:`BadRowError`, or is passed to ``on_bad_row`` and skipped.
    """
    # As read_records names it, so every message spells the file the same way.
    source = str(Path(path))
    row_format = None
    for row, record in read_records(path, on_bad_row):
        if row_format is None:
            row_format = detect_format(record, f"{source}:{row}", formats)
        try:
            example = to_example(record, row_format, source, row)
        except BadRowError as error:
            if on_bad_row is None:
                raise
            on_bad_row(error)
            continue
        yield example
