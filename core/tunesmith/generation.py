"""Text generation from a chat: greedy or sampled, whole or streamed.

``tunesmith infer`` uses it, and so should anything else that generates (a server, batch
inference, GRPO rollouts), so that every caller renders prompts exactly as training did and
stops at the same end-of-turn markers.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from tunesmith.data.tokenize import ensure_chat_template
from tunesmith.errors import ConfigError

# Chat templates end a turn with a marker that is not always the tokenizer's eos token (Llama 3
# ends the sequence with <|end_of_text|> but a turn with <|eot_id|>); generation stops at
# whichever of these the tokenizer has as a single token. <|im_end|> is ChatML's, the template
# ensure_chat_template falls back to.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")


@dataclass(frozen=True)
class GenerationOptions:
    """How to pick tokens. ``temperature`` 0 means greedy; ``top_k`` 0 and ``top_p`` 1.0 disable
    those filters. ``seed`` reseeds torch before each reply, so the same conversation sampled with
    the same seed gives the same reply."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens {self.max_new_tokens}: expected at least 1")
        if self.temperature < 0:
            raise ConfigError(f"temperature {self.temperature}: expected 0 (greedy) or more")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p {self.top_p}: expected a value in (0, 1]")
        if self.top_k < 0:
            raise ConfigError(f"top_k {self.top_k}: expected 0 (off) or more")
        if self.repetition_penalty <= 0:
            raise ConfigError(f"repetition_penalty {self.repetition_penalty}: expected a value above 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def prompt_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """``messages`` rendered with the chat template, ending with the assistant's turn opened.

    Rendered to text and tokenized without added special tokens, as training tokenizes
    conversations, so the model sees the prompt tokens it was trained on.
    """
    ensure_chat_template(tokenizer)
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def stop_token_ids(model, tokenizer) -> list[int]:
    """Token ids that end a reply: the model's and tokenizer's eos plus known end-of-turn markers."""
    ids = set()
    configured = model.generation_config.eos_token_id
    if configured is not None:
        ids.update(configured if isinstance(configured, list) else [configured])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    # A token missing from the vocabulary converts to the unknown token's id (or None).
    markers = (tokenizer.convert_tokens_to_ids(token) for token in END_OF_TURN_TOKENS)
    ids.update(i for i in markers if i is not None and i != tokenizer.unk_token_id)
    return sorted(ids)


def generate_ids(model, tokenizer, messages: list[dict[str, str]], options: GenerationOptions) -> list[int]:
    """The reply's token ids (the stop token, if one was reached, included)."""
    input_ids = _input_tensor(model, tokenizer, messages)
    output = _generate(model, tokenizer, input_ids, options)
    return output[0, input_ids.shape[1] :].tolist()


def generate_reply(model, tokenizer, messages: list[dict[str, str]], options: GenerationOptions) -> str:
    """The assistant's next reply to ``messages`` as text, special tokens dropped."""
    return tokenizer.decode(generate_ids(model, tokenizer, messages, options), skip_special_tokens=True)


def stream_reply(model, tokenizer, messages: list[dict[str, str]], options: GenerationOptions) -> Iterator[str]:
    """The same reply as ``generate_reply``, yielded in pieces as it is generated.

    Generation runs in a thread feeding a ``TextIteratorStreamer``. Closing the iterator early
    stops that thread at its next token; an error in it is raised here.
    """
    from transformers import StoppingCriteriaList, TextIteratorStreamer

    input_ids = _input_tensor(model, tokenizer, messages)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    cancelled = threading.Event()
    failures: list[BaseException] = []

    def run() -> None:
        try:
            _generate(
                model,
                tokenizer,
                input_ids,
                options,
                streamer=streamer,
                stopping_criteria=StoppingCriteriaList([_CancelledCriteria(cancelled)]),
            )
        except BaseException as error:  # re-raised in the consuming thread below
            failures.append(error)
            streamer.end()

    thread = threading.Thread(target=run, name="tunesmith-generate", daemon=True)
    thread.start()
    try:
        yield from streamer
    finally:
        cancelled.set()
        thread.join()
    if failures:
        raise failures[0]


def _input_tensor(model, tokenizer, messages: list[dict[str, str]]) -> torch.Tensor:
    return torch.tensor([prompt_ids(tokenizer, messages)], dtype=torch.long, device=model.device)


def _generate(model, tokenizer, input_ids: torch.Tensor, options: GenerationOptions, **extra) -> torch.Tensor:
    # Every choice is passed explicitly: values left out would be filled from the model's own
    # generation_config (a checkpoint may ship temperature 0.6, top_k 50), so the same options
    # would sample differently on different models. Greedy clears the sampling values so a
    # checkpoint's own temperature does not trigger "do_sample is False" warnings.
    if options.greedy:
        sampling = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    else:
        sampling = {
            "do_sample": True,
            "temperature": options.temperature,
            "top_p": options.top_p,
            "top_k": options.top_k,
        }
        if options.seed is not None:
            # Sampling draws from torch's global generator; generate() takes no generator of its own.
            torch.manual_seed(options.seed)
    return model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=options.max_new_tokens,
        repetition_penalty=options.repetition_penalty,
        eos_token_id=stop_token_ids(model, tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
        **sampling,
        **extra,
    )


class _CancelledCriteria:
    """Stops generation once the consumer of a stream has gone away."""

    def __init__(self, cancelled: threading.Event):
        self.cancelled = cancelled

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.cancelled.is_set(), dtype=torch.bool, device=input_ids.device)
