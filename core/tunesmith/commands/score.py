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
    from tunesmith.runtime import select_runtime

    if model is None and adapter is None:
        raise ConfigError("tunesmith score needs the reward model: --model (a full or merged reward model folder) and/or --adapter")
    if model is not None and adapter is None and (Path(model) / "adapter_config.json").is_file() and not (Path(model) / "config.json").is_file():
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


def load_reward_model(model: str, runtime, adapter_path: Path | None = None, trust_remote_code: bool = False):
    """The reward model (a score head on its base, with an optional peft adapter) and its tokenizer, on the runtime's device."""
    from tunesmith.data.tokenize import ensure_chat_template
    from tunesmith.device import PRECISION_DTYPES
    from tunesmith.models import load_model, load_tokenizer, resolve_model

    model_path = resolve_model(model)
    if adapter_path is None:
        architectures = json.loads((model_path / "config.json").read_text(encoding="utf-8")).get("architectures") or []
        if not any(name.endswith("ForSequenceClassification") for name in architectures):
            raise ConfigError(
                f"--model {model}: not a reward model (its architectures are {', '.join(architectures) or 'not named'}); "
                "give the folder a 'tunesmith rm' run wrote (OUTPUT/final), or its base with --adapter OUTPUT/final"
            )
    else:
        adapter_config = json.loads((adapter_path / "adapter_config.json").read_text(encoding="utf-8"))
        if adapter_config.get("task_type") != "SEQ_CLS":
            raise ConfigError(
                f"--adapter {adapter_path}: not a reward model's adapter (task type {adapter_config.get('task_type')!r}, "
                "expected SEQ_CLS as 'tunesmith rm' writes)"
            )
    tokenizer = load_tokenizer(model_path, trust_remote_code)
    ensure_chat_template(tokenizer)  # as training did, so that rows render the same
    from transformers.utils import logging as transformers_logging

    verbosity = transformers_logging.get_verbosity()
    if adapter_path is not None:  # the base's score head is new: its report of a missing head would mislead, the adapter brings it
        transformers_logging.set_verbosity_error()
    try:
        loaded = load_model(
            model_path, trust_remote_code, dtype=PRECISION_DTYPES[runtime.precision], attn_implementation=runtime.device.attention_implementation(),
            model_kind="sequence_classification", pad_token_id=tokenizer.pad_token_id,
        )
    finally:
        transformers_logging.set_verbosity(verbosity)
    if adapter_path is not None:
        from peft import PeftModel

        loaded = PeftModel.from_pretrained(loaded, adapter_path)
    loaded.to(runtime.device.setup(0))
    loaded.eval()
    return loaded, tokenizer


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
    import torch

    from tunesmith.data.collate import collate_causal
    from tunesmith.data.examples import detect_format, to_example
    from tunesmith.data.readers import read_records
    from tunesmith.data.tokenize import tokenize_prompt_and_responses
    from tunesmith.data.types import Sample
    from tunesmith.errors import DataError
    from tunesmith.models import sequence_scores

    formats = score_formats()
    target = runtime.device.setup(0)
    source = str(input_file)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.with_name(f".{output.name}.partial")
    row_format, pending, count = None, [], 0

    def flush(out) -> None:
        batch = collate_causal([[sample] for _, sample in pending], tokenizer.pad_token_id)
        batch = {key: value.to(target) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}
        with torch.no_grad():
            scores = sequence_scores(model, batch).tolist()
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
                    prompt_ids, (completion_ids,) = tokenize_prompt_and_responses(
                        tokenizer, example.fields["prompt"], [example.fields["completion"]]
                    )
                except DataError as error:
                    raise DataError(f"{example.where}: {error}") from None
                input_ids = (prompt_ids + completion_ids)[-max_length:]
                pending.append((record, Sample(input_ids, list(input_ids))))
                count += 1
                if len(pending) == batch_size:
                    flush(out)
            if pending:
                flush(out)
        os.replace(staging, output)
    finally:
        staging.unlink(missing_ok=True)
    return count
