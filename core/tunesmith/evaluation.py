"""Evaluating a model on a dataset: perplexity over its tokens, and metrics of its generated replies.

``tunesmith eval`` computes these. The metrics (``--metric``):

- ``perplexity``: exp of the mean cross-entropy per token, over the whole file (token-weighted,
  so a long row counts for more than a short one). Rows are any training conversation format
  (only the assistant tokens count, as ``sft`` trains them) or plain ``text`` (every token
  after the first, as ``pt`` trains them).
- ``exact_match``: the fraction of replies equal to their reference, whitespace normalised
  (runs of whitespace read as one space, ends stripped).
- ``bleu``: sacrebleu's corpus BLEU (0 to 100) of the replies against their references.
- ``rouge``: rouge-score's ROUGE-1, ROUGE-2 and ROUGE-L F-measures (stemmed), averaged over rows.
- ``reward:NAME``: a reward function, as ``--reward NAME`` names one (a registered name,
  ``module:function`` or ``rm:PATH``): the mean of the values it gave, and how many replies
  it left unscored (None).

The generation metrics read prompt rows: ``messages`` ending in a user turn, or in the
assistant reply (then the prompt is what comes before it), or ``prompt`` (text or messages).
A row's reference is its ``answer`` column, else its ``reference`` column, else the assistant
reply the row ends with.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tunesmith.batch_inference import PROMPTS_FORMAT, PromptRow
from tunesmith.data.collate import collate_causal
from tunesmith.data.examples import CONVERSATION_FORMATS, FieldError, RowFormat, _messages, read_examples
from tunesmith.data.tokenize import tokenize_chat, tokenize_text
from tunesmith.errors import ConfigError, DataError
from tunesmith.losses import causal_lm_loss

PERPLEXITY = "perplexity"
#: metrics computed on generated replies against a reference
REFERENCE_METRICS = ("exact_match", "bleu", "rouge")
REWARD_PREFIX = "reward:"
METRIC_SHAPES = f"{PERPLEXITY}, {', '.join(REFERENCE_METRICS)} or {REWARD_PREFIX}NAME"
#: the columns a reference is read from, in order of preference
REFERENCE_COLUMNS = ("answer", "reference")
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
#: the module each library-computed metric needs (the ``eval`` extra installs them)
METRIC_LIBRARIES = {"bleu": "sacrebleu", "rouge": "rouge_score.rouge_scorer"}


def check_metrics(metrics: tuple[str, ...]) -> None:
    """Refuse an unknown or repeated ``--metric`` before anything loads."""
    seen = set()
    for metric in metrics:
        known = metric == PERPLEXITY or metric in REFERENCE_METRICS or (metric.startswith(REWARD_PREFIX) and len(metric) > len(REWARD_PREFIX))
        if not known:
            raise ConfigError(f"--metric {metric}: unknown metric; expected {METRIC_SHAPES}")
        if metric in seen:
            raise ConfigError(f"--metric {metric}: given twice")
        seen.add(metric)


def needs_generation(metrics: tuple[str, ...]) -> bool:
    return any(metric != PERPLEXITY for metric in metrics)


def perplexity(model, tokenizer, path: Path, batch_size: int) -> dict[str, Any]:
    """The model's perplexity on ``path``'s rows, weighted by token: ``perplexity``, ``mean_nll``
    (nats per token), ``tokens`` (how many were predicted) and ``rows``."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    # Past the positions the model was built for, its predictions mean nothing.
    longest = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    total_nll, tokens, rows, pending = 0.0, 0, 0, []

    def flush() -> None:
        nonlocal total_nll, tokens
        batch = collate_causal([[sample] for sample in pending], pad)
        with torch.no_grad():
            total_nll += causal_lm_loss(model, {key: _to(value, device) for key, value in batch.items()}).item()
        tokens += batch["num_target_tokens"]
        pending.clear()

    for example in read_examples(path, formats=CONVERSATION_FORMATS):
        try:
            sample = tokenize_text(tokenizer, example.text) if example.text is not None else tokenize_chat(tokenizer, example.messages)
        except DataError as error:
            raise DataError(f"{example.where}: {error}") from None
        if sample.num_trained_tokens == 0:
            raise DataError(f"{example.where}: no token to predict; expected a conversation with an assistant reply, or text of two tokens or more")
        if longest is not None and len(sample) > longest:
            raise DataError(
                f"{example.where}: {len(sample)} tokens, more than the {longest} positions the model takes "
                "(max_position_embeddings); split the row"
            )
        pending.append(sample)
        rows += 1
        if len(pending) == batch_size:
            flush()
    if pending:
        flush()
    if rows == 0:
        raise DataError(f"{path}: no rows to compute perplexity on")
    mean_nll = total_nll / tokens
    return {"perplexity": math.exp(mean_nll), "mean_nll": mean_nll, "tokens": tokens, "rows": rows}


def _to(value, device):
    return value.to(device) if isinstance(value, torch.Tensor) else value


def _from_messages(record: dict[str, Any]) -> dict[str, Any]:
    messages = _messages(record, "messages")
    if messages[-1]["role"] == "assistant":
        if len(messages) < 2:
            raise FieldError("messages", "only an assistant message; expected the prompt before it")
        return {"prompt": messages[:-1], "conversational": True, "reply": messages[-1]["content"]}
    if messages[-1]["role"] != "user":
        raise FieldError("messages", f"ends with a {messages[-1]['role']!r} message; expected a user turn or the assistant reply")
    return {"prompt": messages, "conversational": True}


EVAL_ROW_FORMATS = (RowFormat("OpenAI messages", ("messages",), ("messages",), _from_messages), PROMPTS_FORMAT)


def reference(row: PromptRow, metric: str) -> str:
    """``row``'s reference answer, for ``metric``'s error message if it has none."""
    for column in REFERENCE_COLUMNS:
        value = row.record.get(column)
        if value is not None:
            if isinstance(value, (dict, list)):
                raise DataError(f"{row.where}: {column}: expected the reference text, got a {type(value).__name__}")
            return str(value)
    if row.given_reply is not None:
        return row.given_reply
    raise DataError(
        f"{row.where}: --metric {metric} needs a reference: an {' or '.join(map(repr, REFERENCE_COLUMNS))} column, "
        "or 'messages' ending in the assistant reply"
    )


def normalise_whitespace(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def exact_match(replies: list[str], references: list[str]) -> dict[str, Any]:
    matches = sum(normalise_whitespace(a) == normalise_whitespace(b) for a, b in zip(replies, references, strict=True))
    return {"score": matches / len(replies), "matches": matches, "rows": len(replies)}


def _import_library(module: str, metric: str):
    """The library a metric is computed with, or an error saying how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"--metric {metric} is computed with {module.split('.')[0]}, which is not installed: pip install 'tunesmith[eval]'") from None


def check_libraries(metrics: tuple[str, ...]) -> None:
    """Refuse, before any model loads, a metric whose library is missing."""
    for metric in metrics:
        if metric in METRIC_LIBRARIES:
            _import_library(METRIC_LIBRARIES[metric], metric)


def bleu(replies: list[str], references: list[str]) -> dict[str, Any]:
    sacrebleu = _import_library(METRIC_LIBRARIES["bleu"], "bleu")
    return {"score": sacrebleu.corpus_bleu(replies, [references]).score, "rows": len(replies)}


def rouge(replies: list[str], references: list[str]) -> dict[str, Any]:
    rouge_scorer = _import_library(METRIC_LIBRARIES["rouge"], "rouge")
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    scores = [scorer.score(target, prediction) for prediction, target in zip(replies, references, strict=True)]
    means = {kind: math.fsum(score[kind].fmeasure for score in scores) / len(scores) for kind in ROUGE_TYPES}
    return {**means, "rows": len(replies)}


REFERENCE_METRIC_FUNCTIONS: dict[str, Callable[[list[str], list[str]], dict[str, Any]]] = {
    "exact_match": exact_match,
    "bleu": bleu,
    "rouge": rouge,
}


def reward_inputs(rows: list[PromptRow], replies: list[str]) -> tuple[list, list, dict[str, list]]:
    """Prompts, completions and columns as reward functions take them (as GRPO gives them):
    a row given as messages gets message lists, one given as text gets strings; a column some
    rows lack is None there."""
    prompts = [row.messages if row.conversational else row.messages[-1]["content"] for row in rows]
    completions = [[{"role": "assistant", "content": reply}] if row.conversational else reply for row, reply in zip(rows, replies, strict=True)]
    names = dict.fromkeys(name for row in rows for name in row.columns)
    return prompts, completions, {name: [row.columns.get(name) for row in rows] for name in names}


def reward_metric(values: list[float | None]) -> dict[str, Any]:
    scored = [value for value in values if value is not None]
    return {"mean": math.fsum(scored) / len(scored) if scored else None, "scored": len(scored), "unscored": len(values) - len(scored)}


def write_results(path: Path, results: dict[str, Any]) -> None:
    """Write ``results`` as JSON to ``path``, complete or not at all (a staging file renamed into place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.partial")
    try:
        with staging.open("w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=2, ensure_ascii=False)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)
