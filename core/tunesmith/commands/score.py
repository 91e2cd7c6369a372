"""``tunesmith score``: score prompt/completion rows with a trained reward model (``tunesmith rm``)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import click

from tunesmith.errors import ConfigError
from tunesmith.records import PRECISION_NAMES


@click.command("score")
@click.option(
    "--model",
    default=None,
    show_default="with --adapter, the base recorded in the run's config.yaml, or else in adapter_config.json",
    help="The reward model: a full-model run's OUTPUT/final, a merged folder, or the base model an --adapter was trained on "
    "(a LoRA run's OUTPUT/final given here is taken as --adapter).",
)
@click.option("--adapter", default=None, show_default="none", help="peft adapter folder of a LoRA/DoRA 'tunesmith rm' run (OUTPUT/final or OUTPUT/checkpoint-N).")
@click.option(
    "--file", "input_file", required=True, type=click.Path(path_type=Path),
    help="Rows to score: 'prompt' and 'completion' (each text or a list of messages), or 'messages' ending in the assistant reply.",
)
@click.option("--output", required=True, type=click.Path(path_type=Path), help="JSON Lines file to write: each input row with a 'score' field added.")
@click.option("--batch-size", default=8, type=click.IntRange(min=1), help="Rows scored in one forward pass.")
@click.option("--max-length", default=2048, type=click.IntRange(min=2), help="Longest sequence scored; a longer one loses the start of its prompt.")
@click.option("--trust-remote-code/--no-trust-remote-code", default=False, show_default=True, help="Allow the model folder's own Python code to run.")
@click.option("--device", default="auto", help="Device to run on: a registered device name (tunesmith env lists them), or auto.")
@click.option(
    "--precision", default="auto", type=click.Choice(["auto", *PRECISION_NAMES]),
    help="Weights and compute in this precision; auto picks the device's fastest native one.",
)
def score_command(model, adapter, input_file, output, batch_size, max_length, trust_remote_code, device, precision):
    """Score each row's completion with a reward model; write the rows with their scores.

    A score is the reward model's output at the last token of the prompt and completion
    rendered with the chat template, exactly as 'tunesmith rm' trained it; higher is better.
    """
    from tunesmith.adapters import adapter_folder, base_model
    from tunesmith.plugins import create_plugin_manager
    from tunesmith.reward_model import is_adapter_folder, load_reward_model
    from tunesmith.runtime import select_runtime

    if model is None and adapter is None:
        raise ConfigError("tunesmith score needs the reward model: --model (a full or merged reward model folder) and/or --adapter")
    if model is not None and adapter is None and is_adapter_folder(model):
        model, adapter = None, model  # a LoRA run's OUTPUT/final: the base comes from its run
    runtime = select_runtime(create_plugin_manager(), device, precision)
    adapter_path = adapter_folder(adapter, if_full_model="pass it as --model instead") if adapter is not None else None
    model_name = base_model(model, adapter_path)
    if model is None:
        click.echo(f"base model: {model_name}", err=True)
    click.echo(runtime.describe(), err=True)
    loaded, tokenizer = load_reward_model(model_name, runtime, adapter_path, trust_remote_code)
    count = score_file(loaded, tokenizer, runtime, input_file, output, batch_size, max_length)
    click.echo(f"scored {count} rows into {output}")


def _from_prompt_and_completion(record: dict[str, Any]) -> dict[str, Any]:
    from tunesmith.data.examples import _prompt, _responses

    (completion,) = _responses(record, "completion")
    return {"prompt": _prompt(record), "completion": completion}


def _from_messages(record: dict[str, Any]) -> dict[str, Any]:
    from tunesmith.data.examples import FieldError, _messages

    messages = _messages(record, "messages")
    if len(messages) < 2 or messages[-1]["role"] != "assistant":
        raise FieldError("messages", "expected a conversation ending in the assistant reply to score")
    return {"prompt": messages[:-1], "completion": [messages[-1]]}


def score_formats():
    from tunesmith.data.examples import RowFormat

    return (
        RowFormat("prompt and completion", ("prompt", "completion"), ("prompt", "completion"), _from_prompt_and_completion),
        RowFormat("OpenAI messages", ("messages",), ("messages",), _from_messages),
    )


def score_file(model, tokenizer, runtime, input_file: Path, output: Path, batch_size: int, max_length: int) -> int:
    """Score every row of ``input_file`` in batches, writing ``output`` (complete, or not at all); return the row count."""
    from tunesmith.data.examples import detect_format, to_example
    from tunesmith.data.readers import read_records
    from tunesmith.errors import DataError
    from tunesmith.reward_model import pair_sample, score_samples

    formats = score_formats()
    target = runtime.device.setup(0)
    source = str(input_file)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.with_name(f".{output.name}.partial")
    row_format, pending, count = None, [], 0

    def flush(out) -> None:
        scores = score_samples(model, [sample for _, sample in pending], tokenizer.pad_token_id, target)
        for (record, _), value in zip(pending, scores):
            out.write(json.dumps({**record, "score": value}, ensure_ascii=False, default=str) + "\n")
        pending.clear()

    try:
        with staging.open("w", encoding="utf-8") as out:
            for row, record in read_records(input_file):
                if row_format is None:
                    row_format = detect_format(record, f"{source}:{row}", formats)
                example = to_example(record, row_format, source, row)
                try:
                    sample = pair_sample(tokenizer, example.fields["prompt"], example.fields["completion"], max_length)
                except DataError as error:
                    raise DataError(f"{example.where}: {error}") from None
                pending.append((record, sample))
                count += 1
                if len(pending) == batch_size:
                    flush(out)
            if pending:
                flush(out)
        os.replace(staging, output)
    finally:
        staging.unlink(missing_ok=True)
    return count
