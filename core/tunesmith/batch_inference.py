"""Batch inference: a reply to every prompt row of a file, generated in batches, written resumably.

``tunesmith infer --file`` and ``tunesmith eval`` read prompts and write replies here. A prompt
row is ``messages`` ending in a user turn, or ``prompt`` (text, or a list of messages ending in a user
turn); every other field is kept. The output is JSON Lines, input row by input row, each with
its reply added under :data:`REPLY_FIELD`. It is appended to as batches finish, so a run that
stops (killed, out of memory, a full disk) is resumed by running the same command again: the
rows already written are counted and skipped, the k-th output line belonging to the k-th input
row, and a last line the stop cut in half is dropped and generated again.

Greedy decoding (the default) gives each row the reply it gets alone, whatever the batch it
lands in, up to rounding: in fp32 the replies are the same (the tests check it on the CPU); in
bf16 or fp16, the padding and shape of a batch can change the rounding and, rarely, a token.
Sampled replies with a seed are reproducible row by row: each row is sampled on its own, from a
generator seeded with the seed plus the row's position, so ``--batch-size`` and resuming change
nothing (the price is that such rows are not batched). Sampling without a seed is batched and
differs from run to run.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tunesmith.data.examples import FieldError, RowFormat, _messages, _prompt, detect_format, to_example
from tunesmith.data.readers import read_records
from tunesmith.errors import DataError
from tunesmith.generation import GenerationOptions, generate_batch, prompt_ids

#: the field each output row gains: the generated reply, as text
REPLY_FIELD = "response"


@dataclass(frozen=True)
class PromptRow:
    """One prompt row: where it is (``source:row``), its conversation so far, whether the file
    gave it as a conversation (a list of messages) rather than one string, the row as read, the
    fields its format did not read, and the assistant reply the file itself gives after the
    prompt, if any (an evaluation's reference)."""

    source: str
    row: int
    messages: list[dict[str, str]]
    conversational: bool
    record: dict[str, Any]
    columns: dict[str, Any]
    given_reply: str | None = None

    @property
    def where(self) -> str:
        return f"{self.source}:{self.row}"


def _from_messages(record: dict[str, Any]) -> dict[str, Any]:
    messages = _messages(record, "messages")
    if messages[-1]["role"] != "user":
        raise FieldError("messages", f"ends with a {messages[-1]['role']!r} message; expected the user turn to reply to")
    return {"prompt": messages, "conversational": True}


def _from_prompt(record: dict[str, Any]) -> dict[str, Any]:
    raw = record.get("prompt")
    return {"prompt": _prompt(record), "conversational": not (isinstance(raw, str) and not raw.lstrip().startswith("["))}


#: ``prompt``: text (one user message) or a list of messages ending in a user turn
PROMPTS_FORMAT = RowFormat("prompts", ("prompt",), ("prompt",), _from_prompt)
PROMPT_ROW_FORMATS = (RowFormat("OpenAI messages", ("messages",), ("messages",), _from_messages), PROMPTS_FORMAT)


def read_prompt_rows(path: Path, formats: tuple[RowFormat, ...] = PROMPT_ROW_FORMATS, system: str | None = None) -> list[PromptRow]:
    """Every row of ``path`` as a :class:`PromptRow`, all checked before any is generated.

    ``formats`` convert a record into ``{"prompt": messages, "conversational": bool}`` and
    optionally ``"reply"``, the assistant reply the row gives.
    ``system``, when given, opens each conversation that has no system message of its own.
    """
    source = str(Path(path))
    row_format, rows = None, []
    for row, record in read_records(path):
        if row_format is None:
            row_format = detect_format(record, f"{source}:{row}", formats)
        example = to_example(record, row_format, source, row)
        messages = example.fields["prompt"]
        if system is not None and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": system}, *messages]
        fields = example.fields
        rows.append(PromptRow(source, row, messages, fields["conversational"], record, example.columns, fields.get("reply")))
    return rows


def generate_replies(
    model, tokenizer, prompts: list[list[dict[str, str]]], options: GenerationOptions, batch_size: int, first_index: int = 0
) -> Iterator[list[str]]:
    """The replies to ``prompts``, yielded batch by batch, in order.

    ``first_index`` is the position of ``prompts[0]`` in its file: a seeded sampled reply is
    drawn from a generator seeded with ``options.seed`` plus that position, so it does not
    depend on the batch, nor on where a resumed run started.
    """
    per_row = options.seed is not None and not options.greedy
    step = 1 if per_row else batch_size
    device = next(model.parameters()).device
    for start in range(0, len(prompts), step):
        batch = prompts[start : start + step]
        generator = None
        if per_row:
            generator = torch.Generator(device=device).manual_seed(options.seed + first_index + start)
        ids = [prompt_ids(tokenizer, messages) for messages in batch]
        yield [completion.text for completion in generate_batch(model, tokenizer, ids, options, generator=generator)]


def rows_already_written(output: Path, rows: list[PromptRow]) -> int:
    """How many of ``rows`` ``output`` holds replies to (0 when it does not exist), once a last
    line left half-written is cut off.

    The k-th complete line is the reply to the k-th row. The file is refused, untouched, when
    it has more lines than there are rows, or when its last complete line is not the last
    counted row with a reply added: it was written from other input.
    """
    if not output.exists():
        return 0
    with output.open("r+b") as handle:
        data = handle.read()
        complete = data.rfind(b"\n") + 1
        count = data.count(b"\n", 0, complete)
        if count > len(rows):
            raise DataError(
                f"--output {output}: holds {count} rows but the input has only {len(rows)}; it is the output of another "
                "input file. Give a new --output (or delete this one)"
            )
        if count:
            _check_written_row(output, count, data[data.rfind(b"\n", 0, complete - 1) + 1 : complete], rows[count - 1])
        if complete < len(data):
            handle.truncate(complete)
    return count


def _check_written_row(output: Path, count: int, line: bytes, row: PromptRow) -> None:
    """Refuse an output whose ``count``-th line is not the reply to ``row``."""
    try:
        written = json.loads(line)
    except ValueError:
        written = None
    # Compared as JSON text, as it was written: a NaN read back is not equal to itself.
    if not isinstance(written, dict) or _row_json({key: value for key, value in written.items() if key != REPLY_FIELD}) != _row_json(row.record):
        raise DataError(
            f"--output {output}: its row {count} is not the reply to {row.where}, so it was not written from this input "
            "(or the input changed since). Give a new --output (or delete this one)"
        )


def _row_json(record: dict[str, Any]) -> str:
    return json.dumps(record, ensure_ascii=False, default=str)


def write_replies(
    model,
    tokenizer,
    rows: list[PromptRow],
    output: Path,
    options: GenerationOptions,
    batch_size: int,
    on_progress: Callable[[int, int], None] | None = None,
) -> tuple[int, int]:
    """Reply to every row (from :func:`read_prompt_rows`) into ``output``, resuming what an earlier run wrote.

    ``on_progress(done, total)`` is called at the start and after each batch. Returns how many
    rows were generated now and how many an earlier run had written.
    """
    for row in rows:
        if REPLY_FIELD in row.record:
            raise DataError(f"{row.where}: {REPLY_FIELD}: the row has this field already, and the reply would replace it; rename it")
    output.parent.mkdir(parents=True, exist_ok=True)
    done = rows_already_written(output, rows)
    skipped = done
    if on_progress is not None:
        on_progress(done, len(rows))
    pending = rows[done:]
    with output.open("a", encoding="utf-8") as out:
        batches = generate_replies(model, tokenizer, [row.messages for row in pending], options, batch_size, first_index=done)
        for replies in batches:
            for reply in replies:
                out.write(_row_json({**rows[done].record, REPLY_FIELD: reply}) + "\n")
                out.flush()
                done += 1
            os.fsync(out.fileno())
            if on_progress is not None:
                on_progress(done, len(rows))
    return done - skipped, skipped
