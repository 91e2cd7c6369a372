"""Tokenizing conversations and plain text into :class:`Sample` objects with their labels.

A conversation is rendered with the tokenizer's chat template and tokenized once, as a whole,
so the tokens are exactly those the model sees at inference. The assistant turns are located
in the rendered *text* (by rendering growing prefixes of the conversation) and mapped onto
tokens through the tokenizer's character offsets; nothing depends on a particular template.
"""

from __future__ import annotations

from typing import Any

from jinja2 import TemplateError

from tunesmith.data.types import IGNORE_INDEX, Sample
from tunesmith.errors import DataError

# ChatML, for tokenizers that ship without a chat template.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def ensure_chat_template(tokenizer) -> None:
    """Give ``tokenizer`` the ChatML template if it has none."""
    if tokenizer.chat_template is None:
        tokenizer.chat_template = CHATML_TEMPLATE


def render_chat(tokenizer, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """The conversation rendered by the chat template, and the ``(start, end)`` character span of each assistant turn.

    A span starts where the template's generation prompt ends, and ends where the template
    ends that turn, end-of-turn marker (``<|im_end|>``, ``<|eot_id|>`` ...) included, since the
    model must learn to emit it; the whitespace the template puts between turns is left out,
    as generation stops at the marker and never produces it.
    """
    text = _render(tokenizer, messages, generation_prompt=False)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if not any(earlier["role"] == "user" for earlier in messages[:index]):
            raise DataError(
                f"message {index} is an assistant turn with no user message before it; "
                "a conversation must open with a user (or system then user) message"
            )
        prompt = _render(tokenizer, messages[:index], generation_prompt=True)
        through_turn = _render(tokenizer, messages[: index + 1], generation_prompt=False)
        if not (through_turn.startswith(prompt) and text.startswith(through_turn)):
            raise DataError(
                f"the chat template does not render conversations prefix by prefix (message {index}: the conversation "
                "up to this assistant turn does not begin with the prompt rendered for it, or the whole conversation "
                "does not begin with it), so the assistant turns cannot be located; templates that rewrite earlier "
                "turns, such as ones that drop past reasoning, need a consistent template for training"
            )
        end = len(through_turn.rstrip())
        spans.append((len(prompt), max(end, len(prompt))))
    return text, spans


def tokenize_chat(tokenizer, messages: list[dict[str, str]], columns: dict[str, Any] | None = None) -> Sample:
    """Tokenize a conversation; only the tokens of the assistant turns are labelled."""
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(
            f"the tokenizer {type(tokenizer).__name__} is not a fast (Rust) tokenizer, so it cannot map tokens back to "
            "characters to find the assistant turns; the model folder needs a tokenizer.json"
        )
    text, spans = render_chat(tokenizer, messages)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = list(encoding["input_ids"])
    labels = [IGNORE_INDEX] * len(input_ids)
    # A token is trained when its characters overlap an assistant span; spans and tokens are both in order.
    span_index = 0
    for position, (start, end) in enumerate(encoding["offset_mapping"]):
        while span_index < len(spans) and spans[span_index][1] <= start:
            span_index += 1
        if span_index == len(spans):
            break
        span_start, span_end = spans[span_index]
        if start < span_end and end > span_start:
            labels[position] = input_ids[position]
    return Sample(input_ids=input_ids, labels=labels, columns=dict(columns or {}))


def tokenize_prompt_and_responses(
    tokenizer, prompt: list[dict[str, str]], responses: list[list[dict[str, str]]]
) -> tuple[list[int], list[list[int]]]:
    """The prompt rendered once by the chat template (ending in the generation prompt) and each response's tokens after it.

    A response is what the template renders after the prompt for ``prompt + response``, up to
    and including its end-of-turn marker; prompt and responses are tokenized separately, so
    the prompt's tokens are the same for every response.
    """
    prompt_text = _render(tokenizer, prompt, generation_prompt=True)
    responses_ids = []
    for index, response in enumerate(responses):
        full = _render(tokenizer, prompt + response, generation_prompt=False)
        if not full.startswith(prompt_text):
            raise DataError(
                f"response {index}: the chat template does not render the prompt the same with and without the response, "
                "so the response's tokens cannot be separated from the prompt's"
            )
        responses_ids.append(list(tokenizer(full[len(prompt_text):].rstrip(), add_special_tokens=False)["input_ids"]))
    return list(tokenizer(prompt_text, add_special_tokens=False)["input_ids"]), responses_ids


def tokenize_text(tokenizer, text: str, columns: dict[str, Any] | None = None) -> Sample:
    """Tokenize plain text with the tokenizer's own special tokens and a closing eos token; every token is labelled."""
    input_ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    eos = tokenizer.eos_token_id
    if eos is not None and (not input_ids or input_ids[-1] != eos):
        input_ids.append(eos)
    return Sample(input_ids=input_ids, labels=list(input_ids), columns=dict(columns or {}))


def _render(tokenizer, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except (TemplateError, ValueError) as error:
        raise DataError(f"the chat template rejected the conversation: {error}") from None
