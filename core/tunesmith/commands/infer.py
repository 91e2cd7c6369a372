"""``tunesmith infer``: chat with a model, reply to one prompt, or reply to every row of a file."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import click

from tunesmith import models
from tunesmith.adapters import adapter_folder, base_model
from tunesmith.models import DEFAULT_MODEL
from tunesmith.records import PRECISION_NAMES

CLEAR_COMMAND = "/clear"
EXIT_COMMAND = "/exit"


@click.command("infer")
@click.option(
    "--model",
    default=None,
    show_default=f"{DEFAULT_MODEL}; with --adapter, the base recorded in the run's config.yaml, or else in adapter_config.json",
    help="Local Hugging Face model folder (a merged export works too), or the built-in alias smollm2-135m.",
)
@click.option("--adapter", default=None, show_default="none", help="peft adapter folder to apply (OUTPUT/final or OUTPUT/checkpoint-N).")
@click.option("--prompt", default=None, show_default="none: chat interactively", help="Print the reply to this one message and exit, instead of chatting.")
@click.option(
    "--file", "input_file", default=None, type=click.Path(path_type=Path), show_default="none: chat interactively",
    help="Reply to every row of this file: 'messages' ending in a user turn, or 'prompt' (text or messages). Needs --output.",
)
@click.option(
    "--output", default=None, type=click.Path(path_type=Path), show_default="none",
    help="With --file: JSON Lines file of the input rows, each with its reply added as 'response'. "
    "Written as rows finish; running the same command again resumes it.",
)
@click.option("--batch-size", default=8, type=click.IntRange(min=1), help="With --file: prompts generated together in one batch.")
@click.option(
    "--system", default=None, show_default="none: the chat template's own, if any",
    help="System message that opens the conversation (with --file: each row's that has none of its own).",
)
@click.option("--max-new-tokens", default=256, type=click.IntRange(min=1), help="Most tokens to generate per reply.")
@click.option("--temperature", default=0.0, type=click.FloatRange(min=0.0), help="Sampling temperature; 0 is greedy.")
@click.option("--top-p", default=1.0, type=click.FloatRange(min=0.0, max=1.0, min_open=True), help="Nucleus sampling; 1.0 is off.")
@click.option("--top-k", default=0, type=click.IntRange(min=0), help="Sample among the k likeliest tokens; 0 is off.")
@click.option("--repetition-penalty", default=1.0, type=click.FloatRange(min=0.0, min_open=True), help="Penalty on repeated tokens; 1.0 is off.")
@click.option(
    "--seed", default=None, type=int, show_default="unseeded",
    help="Seed for sampling, so a reply can be reproduced (with --file, each row's, whatever the batch or resume).",
)
@click.option("--trust-remote-code/--no-trust-remote-code", default=False, show_default=True, help="Allow the model folder's own Python code to run.")
@click.option("--device", default="auto", help="Device to run on: a registered device name (tunesmith env lists them), or auto.")
@click.option(
    "--precision", default="auto", type=click.Choice(["auto", *PRECISION_NAMES]),
    help="Weights and compute in this precision; auto picks the device's fastest native one.",
)
def infer_command(
    model, adapter, prompt, input_file, output, batch_size, system, max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed, trust_remote_code, device, precision
):
    """Generate replies: one reply to --prompt, one per row of --file, or an interactive chat on stdin.

    In the chat, /clear starts a new conversation and /exit or end of input (Ctrl-D) quits.
    With --file, a run that stopped part way is resumed by the same command: rows already in
    --output are kept and skipped, and a last line cut in half is generated again.
    """
    from tunesmith.batch_inference import read_prompt_rows, write_replies
    from tunesmith.generation import GenerationOptions, generate_reply
    from tunesmith.plugins import create_plugin_manager
    from tunesmith.runtime import select_runtime

    if input_file is not None and prompt is not None:
        raise click.UsageError("--file and --prompt: give one of them")
    if (input_file is None) != (output is None):
        raise click.UsageError("--file and --output go together: --output names where the replies to --file's rows go")
    runtime = select_runtime(create_plugin_manager(), device, precision)
    options = GenerationOptions(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        repetition_penalty=repetition_penalty,
        seed=seed,
    )
    adapter_path = adapter_folder(adapter, if_full_model="pass it as --model instead") if adapter is not None else None
    model_name = base_model(model, adapter_path)
    if model is None and adapter_path is not None:
        click.echo(f"base model: {model_name}", err=True)
    click.echo(runtime.describe(), err=True)
    rows = read_prompt_rows(input_file, system=system) if input_file is not None else None  # every row checked before the model loads
    loaded, tokenizer = models.load_for_inference(model_name, runtime, adapter_path, trust_remote_code)

    if rows is not None:
        with reply_progress() as progress:
            generated, skipped = write_replies(loaded, tokenizer, rows, output, options, batch_size, on_progress=progress)
        resumed = f" ({skipped} already there from an earlier run)" if skipped else ""
        click.echo(f"wrote {generated} replies into {output}{resumed}")
        return
    opening = [{"role": "system", "content": system}] if system is not None else []
    if prompt is not None:
        click.echo(generate_reply(loaded, tokenizer, [*opening, {"role": "user", "content": prompt}], options))
        return
    _chat(loaded, tokenizer, opening, options)


@contextmanager
def reply_progress() -> Iterator[Callable[[int, int], None]]:
    """A progress bar of replies on stderr, shown while the block runs; yields ``update(done, total)``."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(
        TextColumn("[bold]replies"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=Console(stderr=True)
    ) as progress:
        task = progress.add_task("replies", total=None)
        yield lambda done, total: progress.update(task, completed=done, total=total)


def _chat(model, tokenizer, opening: list[dict[str, str]], options) -> None:
    from tunesmith.generation import stream_reply

    click.echo(f"{CLEAR_COMMAND} starts a new conversation; {EXIT_COMMAND} or Ctrl-D quits.", err=True)
    messages = list(opening)
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            click.echo(err=True)
            return
        text = line.strip()
        if not text:
            continue
        if text == EXIT_COMMAND:
            return
        if text == CLEAR_COMMAND:
            messages = list(opening)
            click.echo("(conversation cleared)", err=True)
            continue
        messages.append({"role": "user", "content": text})
        pieces = []
        for piece in stream_reply(model, tokenizer, messages, options):
            click.echo(piece, nl=False)
            pieces.append(piece)
        click.echo()
        messages.append({"role": "assistant", "content": "".join(pieces)})
