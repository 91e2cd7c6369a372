"""The batched decode loop: many token sequences continued at once, one token per row per step.

Prompts are left-padded so that every row's next token sits in the last column; the attention
mask hides the padding and position ids count only real tokens, so a padded row computes what
it would alone. A KV cache holds the keys and values already computed, so each step after the
first (the prefill) runs the model on one new token per row. Rows sharing a prompt are
prefilled once and the cache is then repeated for them.

Randomness comes only from the ``torch.Generator`` given: torch's global generator, which
orders training data and is saved for an exact resume, is never drawn from.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from tunesmith.errors import ConfigError

if TYPE_CHECKING:
    from tunesmith.generation import GenerationOptions

#: :attr:`Row.finish_reason` when a stop token or a stop string ended the row
STOP = "stop"
#: :attr:`Row.finish_reason` when the row reached ``max_new_tokens``
LENGTH = "length"


@dataclass
class Row:
    """One sequence being generated: its new tokens so far and, once it has ended, why.

    ``logprobs`` holds, for each new token, its log-probability under the model's own
    distribution (before the repetition penalty, temperature and top-k/top-p filters).
    """

    token_ids: list[int]
    finish_reason: str | None = None
    logprobs: list[float] = field(default_factory=list)


@contextmanager
def generation_mode(model: torch.nn.Module) -> Iterator[None]:
    """Put ``model`` in the state generation needs, and back exactly as it was afterwards.

    Generation needs eval mode (no dropout), activation checkpointing off (it recomputes nothing
    without gradients, and transformers turns the KV cache off under it) and ``use_cache`` on.
    Training mode is restored module by module, since a frozen part may have been in eval mode.
    """
    training = {module: module.training for module in model.modules()}
    # transformers marks each checkpointed layer with a gradient_checkpointing flag; resetting
    # the flags, rather than calling *_checkpointing_enable, keeps the caller's checkpoint options.
    checkpointed = [module for module in model.modules() if getattr(module, "gradient_checkpointing", False) is True]
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    model.eval()
    for module in checkpointed:
        module.gradient_checkpointing = False
    if config is not None:
        config.use_cache = True
    try:
        yield
    finally:
        if config is not None:
            config.use_cache = use_cache
        for module in checkpointed:
            module.gradient_checkpointing = True
        for module, was_training in training.items():
            module.training = was_training


def select_tokens(
    logits: torch.Tensor, seen: torch.Tensor | None, options: GenerationOptions, generator: torch.Generator | None
) -> torch.Tensor:
    """The next token of each row from its float32 ``logits`` (rows x vocabulary).

    ``seen`` marks, per row, the tokens already in the sequence, for the repetition penalty
    (a seen token's positive logit is divided by the penalty, a negative one multiplied).
    Temperature 0 takes the likeliest token; otherwise logits are divided by the temperature,
    cut to the ``top_k`` likeliest and then to the smallest set whose probability reaches
    ``top_p``, and one token is drawn with ``generator``.
    """
    if seen is not None:
        penalty = options.repetition_penalty
        logits = torch.where(seen, torch.where(logits < 0, logits * penalty, logits / penalty), logits)
    if options.greedy:
        return logits.argmax(dim=-1)
    logits = logits / options.temperature
    if 0 < options.top_k < logits.shape[-1]:
        kth_largest = logits.topk(options.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if options.top_p < 1:
        probabilities, order = logits.softmax(dim=-1).sort(dim=-1, descending=True)
        # A token is cut when the likelier tokens before it already reach top_p; the likeliest never is.
        mass_before = probabilities.cumsum(dim=-1) - probabilities
        cut = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, order, mass_before >= options.top_p)
        logits = logits.masked_fill(cut, float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


class StopStrings:
    """Whether a row's text now contains one of the stop strings.

    Only the last tokens are decoded each step: enough to hold the longest stop string even
    when every character takes four byte-level tokens.
    """

    def __init__(self, tokenizer, strings: Sequence[str]):
        if isinstance(strings, str) or any(not isinstance(s, str) or not s for s in strings):
            raise ConfigError(f"stop strings {strings!r}: expected a list of non-empty strings, e.g. ['\\n\\n']")
        self.tokenizer = tokenizer
        self.strings = tuple(strings)
        self.window = 4 * max((len(s) for s in self.strings), default=0) + 4

    def __bool__(self) -> bool:
        return bool(self.strings)

    def found_in(self, token_ids: list[int]) -> bool:
        tail = self.tokenizer.decode(token_ids[-self.window :], skip_special_tokens=True)
        return any(s in tail for s in self.strings)

    def cut(self, text: str) -> str:
        """``text`` up to the first stop string in it."""
        positions = [i for i in (text.find(s) for s in self.strings) if i >= 0]
        return text[: min(positions)] if positions else text


def decode(
    model: torch.nn.Module,
    prompts: list[list[int]],
    options: GenerationOptions | Sequence[GenerationOptions],
    *,
    pad_token_id: int,
    stop_token_ids: Sequence[int],
    stop_strings: StopStrings | None = None,
    num_return_sequences: int = 1,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    all_finished: Callable[[bool], bool] | None = None,
) -> Iterator[list[Row]]:
    """Continue every prompt ``num_return_sequences`` times; yield the rows after each step.

    Rows are prompt-major (prompt 0's sequences first) and are the same objects at every yield,
    grown by one token each step until they finish; a finished row gets no more tokens. When
    the generator is exhausted every row has its ``finish_reason``. A caller may also end a row
    between two yields by setting its ``finish_reason`` (a server whose client went away, a
    stop string only that row has): it gets no more tokens from the next step on. ``model``
    must already be in :func:`generation_mode`. ``all_finished`` (see
    :func:`tunesmith.generation.generate_batch`) is called once before every step after the
    first, with whether this process's rows are all finished; the loop goes on until it
    answers True.

    ``options`` and ``generator`` are one for every prompt, or a sequence with one per prompt:
    each prompt's rows are then sampled with its own options, up to its own
    ``max_new_tokens``, drawing from its own generator, so what one prompt samples does not
    depend on the other prompts in the batch.
    """
    device = next(model.parameters()).device
    rows = [Row([]) for _ in range(len(prompts) * num_return_sequences)]
    row_options = _per_row(options, len(prompts), num_return_sequences, "options")
    row_generators = _per_row(generator, len(prompts), num_return_sequences, "generators")
    groups = _sampling_groups(row_options, row_generators, device)
    longest = max(option.max_new_tokens for option in row_options)
    input_ids, attention_mask = _left_padded(prompts, pad_token_id, device)
    stop_ids = torch.tensor(sorted(set(stop_token_ids)), dtype=torch.long, device=device)

    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    cache_keyword = _cache_keyword(model)
    logits = _forward(model, input_ids, attention_mask, cache, cache_keyword)
    seen = None
    if any(option.repetition_penalty != 1 for option in row_options):
        # Counted, not flagged: a pad position adds 0 and so cannot unmark a real token sharing its id.
        counts = torch.zeros(logits.shape, dtype=torch.long, device=device).scatter_add_(1, input_ids, attention_mask)
        seen = (counts > 0).repeat_interleave(num_return_sequences, dim=0)
    if num_return_sequences > 1:
        cache.batch_repeat_interleave(num_return_sequences)
        logits = logits.repeat_interleave(num_return_sequences, dim=0)
        attention_mask = attention_mask.repeat_interleave(num_return_sequences, dim=0)
    running = torch.ones(len(rows), dtype=torch.bool, device=device)

    for step in range(longest):
        tokens = _select(logits, seen, groups)
        logprobs = (logits.gather(1, tokens[:, None]).squeeze(1) - logits.logsumexp(dim=-1)).tolist()
        tokens = torch.where(running, tokens, pad_token_id)
        if seen is not None:
            seen[torch.arange(len(rows), device=device), tokens] |= running
        stopped = running & torch.isin(tokens, stop_ids)
        for index, (token, was_running, stopped_by_token) in enumerate(
            zip(tokens.tolist(), running.tolist(), stopped.tolist())
        ):
            if not was_running:
                continue
            row = rows[index]
            row.token_ids.append(token)
            row.logprobs.append(logprobs[index])
            if stopped_by_token or (stop_strings and stop_strings.found_in(row.token_ids)):
                row.finish_reason = STOP
            elif len(row.token_ids) == row_options[index].max_new_tokens:
                row.finish_reason = LENGTH
        yield rows
        if step == longest - 1:
            return
        # The new token is attended to only where it is real; a finished row continues on padding.
        attention_mask = torch.cat([attention_mask, running[:, None].long()], dim=1)
        still_running = [row.finish_reason is None for row in rows]
        running = torch.tensor(still_running, dtype=torch.bool, device=device)
        local_done = not any(still_running)
        if all_finished(local_done) if all_finished is not None else local_done:
            return
        logits = _forward(model, tokens[:, None], attention_mask, cache, cache_keyword)


def _per_row(value, prompt_count: int, num_return_sequences: int, what: str) -> list:
    """``value`` for every row: the one value repeated, or one per prompt repeated for its rows."""
    if value is None or not isinstance(value, Sequence):
        return [value] * (prompt_count * num_return_sequences)
    if len(value) != prompt_count:
        raise ConfigError(f"{len(value)} {what} for {prompt_count} prompts: expected one for all prompts or one per prompt")
    return [item for item in value for _ in range(num_return_sequences)]


def _sampling_groups(row_options: list, row_generators: list, device: torch.device) -> list[tuple[torch.Tensor | None, object, object]]:
    """The rows whose tokens are chosen together, as (row indices, options, generator); the
    indices are None when one group holds every row. Rows share a group when they choose
    tokens the same way: the same filters and the same generator, which greedy rows never use."""
    members: dict[tuple, list[int]] = {}
    for index, (option, generator) in enumerate(zip(row_options, row_generators)):
        key = (option.temperature, option.top_k, option.top_p, option.repetition_penalty, None if option.greedy else id(generator))
        members.setdefault(key, []).append(index)
    if len(members) == 1:
        return [(None, row_options[0], row_generators[0])]
    return [
        (torch.tensor(indices, device=device), row_options[indices[0]], row_generators[indices[0]]) for indices in members.values()
    ]


def _select(logits: torch.Tensor, seen: torch.Tensor | None, groups) -> torch.Tensor:
    """Each row's next token, chosen with its group's options and generator."""
    if groups[0][0] is None:
        _, options, generator = groups[0]
        return select_tokens(logits, seen, options, generator)
    tokens = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    for indices, options, generator in groups:
        tokens[indices] = select_tokens(logits[indices], seen[indices] if seen is not None else None, options, generator)
    return tokens


def _left_padded(prompts: list[list[int]], pad_token_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(prompt) for prompt in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for index, prompt in enumerate(prompts):
        if prompt:
            input_ids[index, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            attention_mask[index, width - len(prompt) :] = 1
    return input_ids.to(device), attention_mask.to(device)


def _forward(model, input_ids, attention_mask, cache, cache_keyword: str) -> torch.Tensor:
    """The last position's logits in float32, the cache extended by ``input_ids``."""
    # Positions count real tokens only, so a left-padded row is positioned as if unpadded.
    position_ids = (attention_mask.cumsum(dim=-1) - 1).clamp(min=0)[:, -input_ids.shape[1] :]
    with torch.no_grad():
        output = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            logits_to_keep=1,
            **{cache_keyword: cache},
        )
    return output.logits[:, -1, :].float()


def _cache_keyword(model) -> str:
    """The forward argument taking the KV cache: ``cache`` from transformers 5.25, ``past_key_values`` before."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
