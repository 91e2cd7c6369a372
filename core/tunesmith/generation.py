"""Text generation: many prompts at once for rollouts, or one chat reply, whole or streamed.

``tunesmith infer`` uses it, and so should anything else that generates (a server, batch
inference, GRPO rollouts), so that every caller renders prompts exactly as training did and
stops at the same end-of-turn markers. Tokens are chosen by tunesmith's own decode loop
(:mod:`tunesmith.decoding`), which draws random numbers only from an explicit
``torch.Generator``: sampling never disturbs the global RNG that training's data order and
exact resume depend on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from tunesmith.data.tokenize import ensure_chat_template
from tunesmith.decoding import StopStrings, decode, generation_mode
from tunesmith.errors import ConfigError

# Chat templates end a turn with a marker that is not always the tokenizer's eos token (Llama 3
# ends the sequence with <|end_of_text|> but a turn with <|eot_id|>); generation stops at
# whichever of these the tokenizer has as a single token. <|im_end|> is ChatML's, the template
# ensure_chat_template falls back to.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")


@dataclass(frozen=True)
class GenerationOptions:
    """How to pick tokens. ``temperature`` 0 means greedy; ``top_k`` 0 and ``top_p`` 1.0 disable
    those filters; ``repetition_penalty`` 1.0 is off. ``seed`` seeds the ``torch.Generator`` a call
    makes when it is given none, so the same prompts sampled with the same seed give the same
    replies; without a seed (and without a generator) sampling differs from call to call."""

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
    generation_config = getattr(model, "generation_config", None)
    configured = getattr(generation_config, "eos_token_id", None)
    if configured is not None:
        ids.update(configured if isinstance(configured, list) else [configured])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    # A token missing from the vocabulary converts to the unknown token's id (or None).
    markers = (tokenizer.convert_tokens_to_ids(token) for token in END_OF_TURN_TOKENS)
    ids.update(i for i in markers if i is not None and i != tokenizer.unk_token_id)
    return sorted(ids)


@dataclass(frozen=True)
class Completion:
    """One generated continuation of one prompt.

    ``token_ids`` are the new tokens, the stop token included when one ended the completion (a
    policy being trained must learn to emit it). ``text`` is their decoding without special
    tokens, cut before the first stop string. ``finish_reason`` is ``"stop"`` when a stop
    token or stop string ended it, ``"length"`` when ``max_new_tokens`` did.
    """

    prompt_index: int
    token_ids: list[int]
    text: str
    finish_reason: str


def generate_batch(
    model,
    tokenizer,
    prompts: list[list[int]],
    options: GenerationOptions,
    *,
    num_return_sequences: int = 1,
    generator: torch.Generator | None = None,
    stop_strings: Sequence[str] = (),
    all_finished: Callable[[bool], bool] | None = None,
) -> list[Completion]:
    """Continue every prompt ``num_return_sequences`` times, all in one batch; prompt-major order.

    ``prompts`` are token ids (:func:`prompt_ids` renders a chat). ``model`` is a transformers
    causal LM or a peft model around one, not a strategy's wrapper: pass
    ``strategy.unwrap(model)`` (under FSDP2 that is the sharded model itself, so pass
    ``all_finished`` too). It runs without gradients, in eval mode, with activation
    checkpointing off and the KV cache on, and is returned to its own modes afterwards, also
    when generation fails. A completion ends at a token of :func:`stop_token_ids`, at any of
    ``stop_strings`` (matched in the text without special tokens) or after
    ``options.max_new_tokens``.

    Sampling draws only from ``generator`` (on the model's device); without one, a generator is
    made, seeded from ``options.seed`` when set. The global RNG is never used.

    ``all_finished`` makes several processes step together, as a sharded model needs (each
    forward pass gathers parameters from every process). It is called before each step after
    the first with whether this process's completions have all ended, and must return whether
    every process's have (:func:`every_process_finished` asks a strategy's processes); until
    it does, a finished process keeps running forward passes on padding. Every process must
    pass the same ``options.max_new_tokens`` and at least one prompt. Without it, generation
    stops as soon as this process is done.

    Example::

        ids = [prompt_ids(tokenizer, [{"role": "user", "content": q}]) for q in questions]
        completions = generate_batch(strategy.unwrap(model), tokenizer, ids, GenerationOptions(temperature=1.0),
                                     num_return_sequences=8, generator=torch.Generator().manual_seed(0),
                                     all_finished=every_process_finished(strategy))
    """
    if num_return_sequences < 1:
        raise ConfigError(f"num_return_sequences {num_return_sequences}: expected at least 1")
    empty = [index for index, prompt in enumerate(prompts) if len(prompt) == 0]
    if empty:
        raise ConfigError(f"prompt {empty[0]} has no tokens; every prompt needs at least one (a chat template's opening)")
    if not prompts:
        if all_finished is not None:
            raise ConfigError("no prompts: a process stepping together with others (all_finished) needs at least one prompt")
        return []
    device = next(model.parameters()).device
    checked_stop_strings = StopStrings(tokenizer, stop_strings)
    with generation_mode(model):
        for rows in decode(
            model,
            [list(prompt) for prompt in prompts],
            options,
            pad_token_id=pad_token_id(tokenizer),
            stop_token_ids=stop_token_ids(model, tokenizer),
            stop_strings=checked_stop_strings,
            num_return_sequences=num_return_sequences,
            generator=_generator(generator, options, device),
            all_finished=all_finished,
        ):
            pass
    return [
        Completion(
            prompt_index=index // num_return_sequences,
            token_ids=row.token_ids,
            text=checked_stop_strings.cut(tokenizer.decode(row.token_ids, skip_special_tokens=True)),
            finish_reason=row.finish_reason,
        )
        for index, row in enumerate(rows)
    ]


def every_process_finished(strategy) -> Callable[[bool], bool]:
    """The ``all_finished`` of :func:`generate_batch` for ``strategy``'s processes: each process
    tells whether it is done, and all of them hear True once every one is (an all-reduce)."""

    def all_finished(done: bool) -> bool:
        return bool(strategy.reduce(torch.tensor([int(done)]), "min").item())

    return all_finished


def generate_ids(model, tokenizer, messages: list[dict[str, str]], options: GenerationOptions) -> list[int]:
    """The reply's token ids (the stop token, if one was reached, included)."""
    return generate_batch(model, tokenizer, [prompt_ids(tokenizer, messages)], options)[0].token_ids


def generate_reply(model, tokenizer, messages: list[dict[str, str]], options: GenerationOptions) -> str:
    """The assistant's next reply to ``messages`` as text, special tokens dropped."""
    return tokenizer.decode(generate_ids(model, tokenizer, messages, options), skip_special_tokens=True)


def stream_reply(model, tokenizer, messages: list[dict[str, str]], options: GenerationOptions) -> Iterator[str]:
    """The same reply as ``generate_reply``, yielded in pieces as it is generated.

    Each token is generated when the next piece is asked for, in the caller's thread, so an
    error is raised to the caller and closing the iterator early stops generation there. The
    model stays in generation mode while the iterator is open.
    """
    device = next(model.parameters()).device
    sent = text = ""
    with generation_mode(model):
        steps = decode(
            model,
            [prompt_ids(tokenizer, messages)],
            options,
            pad_token_id=pad_token_id(tokenizer),
            stop_token_ids=stop_token_ids(model, tokenizer),
            generator=_generator(None, options, device),
        )
        try:
            for rows in steps:
                text = tokenizer.decode(rows[0].token_ids, skip_special_tokens=True)
                # A character split over byte-level tokens decodes to U+FFFD until it is whole;
                # text that rewrites what was already sent is held back until it extends it.
                if text.startswith(sent) and not text.endswith("\ufffd") and len(text) > len(sent):
                    yield text[len(sent) :]
                    sent = text
        finally:
            steps.close()
    if text.startswith(sent) and len(text) > len(sent):
        yield text[len(sent) :]


def pad_token_id(tokenizer) -> int:
    """The id prompts are left-padded with: the tokenizer's pad token, else its eos token."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ConfigError("the tokenizer has neither a pad token nor an eos token to pad prompts with; set tokenizer.pad_token")
    return pad


def _generator(generator: torch.Generator | None, options: GenerationOptions, device: torch.device) -> torch.Generator:
    """The generator to sample with: the caller's, which must be on the model's device, or a new one."""
    if generator is not None:
        if generator.device.type != device.type:
            raise ConfigError(
                f"the generator is on {generator.device} but the model is on {device}; "
                f"make it there: torch.Generator(device={str(device)!r})"
            )
        return generator
    fresh = torch.Generator(device=device)
    if options.seed is not None:
        fresh.manual_seed(options.seed)
    else:
        fresh.seed()
    return fresh
