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

from tunesmith.device import widest_float
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
    return draw(logits.softmax(dim=-1), generator)


def draw(probabilities: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One index per row, drawn with the row's ``probabilities``: where a uniform number falls in their running sum.

    ``torch.multinomial`` takes 40 times as long on CPU for a row of a large vocabulary, and a
    token is drawn at every step of every row. A token of probability 0 (cut by ``top_k`` or
    ``top_p``) has an empty interval and is never drawn. The sum is in float64 where the device
    has it (:func:`tunesmith.device.widest_float`), else float32. The point is below the total:
    the uniform number is at most 1 - 2^-53 (1 - 2^-24 in float32) and the total, near 1, is
    between 0.5 and 2, where that product always rounds below the total (or is exact, for a
    total of 1).
    """
    dtype = widest_float(probabilities.device)
    totals = probabilities.to(dtype).cumsum(dim=-1)
    uniform = torch.rand((len(probabilities), 1), dtype=dtype, generator=generator, device=probabilities.device)
    return torch.searchsorted(totals, uniform * totals[:, -1:], right=True).squeeze(-1)


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


class DecodeBatch:
    """Rows continued together, one token per row per step; rows may join and leave between steps.

    :meth:`add` prefills new prompts and puts their rows beside those already running;
    :meth:`step` gives every running row its next token; :meth:`drop` takes rows out, freeing
    their share of each forward pass. :func:`decode` runs a fixed set of rows this way, and a
    server's worker (:mod:`tunesmith.serving.batcher`) lets requests join and leave as they come.

    Every row sits right-aligned in one left-padded KV cache: a row that joins later is padded
    on the left to the running rows' width (or they to its), and the attention mask hides the
    padding, so each row computes what it would alone. A row that finished but was not dropped
    goes on beside the others on masked padding and gains no tokens. Each prompt's rows sample
    with its own options and generator, so what they draw does not depend on the other rows.
    ``model`` must already be in :func:`generation_mode`.
    """

    def __init__(
        self, model: torch.nn.Module, *, pad_token_id: int, stop_token_ids: Sequence[int], stop_strings: StopStrings | None = None
    ):
        self.model = model
        self.pad_token_id = pad_token_id
        self.stop_strings = stop_strings
        self._device = next(model.parameters()).device
        self._stop_ids = torch.tensor(sorted(set(stop_token_ids)), dtype=torch.long, device=self._device)
        self._cache_keyword = _cache_keyword(model)
        self._empty()

    def _empty(self) -> None:
        self.rows: list[Row] = []
        self._options: list[GenerationOptions] = []
        self._generators: list[torch.Generator | None] = []
        self._groups: list = []
        self._cache = None
        self._attention_mask: torch.Tensor | None = None
        # Either every row's next-token logits are known, or the tokens the last step chose are
        # still to be run through the model (lazily: a row dropped meanwhile costs nothing).
        self._logits: torch.Tensor | None = None
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self._seen: torch.Tensor | None = None

    @property
    def joinable(self) -> bool:
        """Whether rows can join while others run: when the cache is empty or every layer keeps
        all positions (a sliding-window layer's cut would differ between rows)."""
        from transformers.cache_utils import DynamicLayer

        return self._cache is None or all(type(layer) is DynamicLayer for layer in self._cache.layers)

    def add(
        self,
        prompts: Sequence[list[int]],
        options: Sequence[GenerationOptions],
        generators: Sequence[torch.Generator | None],
        copies: Sequence[int],
    ) -> list[Row]:
        """Prefill ``prompts`` and add ``copies[i]`` rows continuing prompt ``i``; the new rows, prompt-major.

        Prompt ``i``'s rows sample with ``options[i]`` and ``generators[i]`` (greedy rows use
        none). Each prompt is run through the model once and its cache repeated for its rows.
        """
        from transformers import DynamicCache

        if self.rows and not self.joinable:
            raise ValueError("this model's cache has sliding-window layers: rows can only be added to an empty batch")
        if self._pending is not None:
            self._run_pending()
        cache = DynamicCache(config=self.model.config)
        input_ids, attention_mask = _left_padded(list(prompts), self.pad_token_id, self._device)
        logits = _forward(self.model, input_ids, attention_mask, cache, self._cache_keyword)
        if any(count != 1 for count in copies):
            index = torch.arange(len(prompts), device=self._device).repeat_interleave(torch.tensor(copies, device=self._device))
            cache.batch_select_indices(index)
            logits, attention_mask = logits[index], attention_mask[index]
        if self._seen is not None or any(option.repetition_penalty != 1 for option in options):
            joining = [list(prompt) for prompt, count in zip(prompts, copies) for _ in range(count)]
            seen = _seen_tokens(joining, logits.shape[-1], self._device)
            if self.rows:
                # Rows that ran without seen tokens have no repetition penalty, so theirs are never read.
                earlier = self._seen if self._seen is not None else seen.new_zeros((len(self.rows), seen.shape[1]))
                seen = torch.cat([earlier, seen])
            self._seen = seen
        for option, generator, count in zip(options, generators, copies):
            self._options += [option] * count
            self._generators += [generator] * count
        new_rows = [Row([]) for _ in range(sum(copies))]
        if self.rows:
            _join_caches(self._cache, cache)
            self._attention_mask = _join_left_padded(self._attention_mask, attention_mask)
            self._logits = torch.cat([self._logits, logits])
        else:
            self._cache, self._attention_mask, self._logits = cache, attention_mask, logits
        self.rows += new_rows
        self._groups = _sampling_groups(self._options, self._generators, self._device)
        return new_rows

    def step(self) -> None:
        """Give every row without a ``finish_reason`` its next token, and a ``finish_reason`` when
        a stop token, stop string or its ``max_new_tokens`` ends it. A caller may end a row before
        a step by setting its ``finish_reason``."""
        if self._pending is not None:
            self._run_pending()
        running = torch.tensor([row.finish_reason is None for row in self.rows], dtype=torch.bool, device=self._device)
        logits = self._logits
        tokens = _select(logits, self._seen, self._groups)
        logprobs = (logits.gather(1, tokens[:, None]).squeeze(1) - logits.logsumexp(dim=-1)).tolist()
        tokens = torch.where(running, tokens, self.pad_token_id)
        if self._seen is not None:
            self._seen[torch.arange(len(self.rows), device=self._device), tokens] |= running
        stopped = running & torch.isin(tokens, self._stop_ids)
        for row, option, token, was_running, stopped_by_token, logprob in zip(
            self.rows, self._options, tokens.tolist(), running.tolist(), stopped.tolist(), logprobs
        ):
            if not was_running:
                continue
            row.token_ids.append(token)
            row.logprobs.append(logprob)
            if stopped_by_token or (self.stop_strings and self.stop_strings.found_in(row.token_ids)):
                row.finish_reason = STOP
            elif len(row.token_ids) == option.max_new_tokens:
                row.finish_reason = LENGTH
        self._pending = (tokens, running)

    def drop(self, rows: Sequence[Row]) -> None:
        """Take ``rows`` out of the batch; the others go on as before."""
        leaving = {id(row) for row in rows}
        kept = [index for index, row in enumerate(self.rows) if id(row) not in leaving]
        if not kept:
            self._empty()
            return
        if len(kept) == len(self.rows):
            return
        index = torch.tensor(kept, device=self._device)
        self._cache.batch_select_indices(index)
        self._attention_mask = self._attention_mask[index]
        if self._pending is not None:
            self._pending = (self._pending[0][index], self._pending[1][index])
        else:
            self._logits = self._logits[index]
        if self._seen is not None:
            self._seen = self._seen[index]
        for name in ("rows", "_options", "_generators"):
            setattr(self, name, [getattr(self, name)[i] for i in kept])
        self._groups = _sampling_groups(self._options, self._generators, self._device)
        if self.joinable:
            self._trim_padding()

    def _run_pending(self) -> None:
        """Run the last step's tokens through the model, for every row's next logits."""
        tokens, real = self._pending
        # The new token is attended to only where it is real; a finished row continues on padding.
        self._attention_mask = torch.cat([self._attention_mask, real[:, None].long()], dim=1)
        self._logits = _forward(self.model, tokens[:, None], self._attention_mask, self._cache, self._cache_keyword)
        self._pending = None

    def _trim_padding(self) -> None:
        """Cut the cache's leading positions that are padding in every row (left by a longer row that left)."""
        first = int(self._attention_mask.any(dim=0).long().argmax())
        if first == 0:
            return
        self._attention_mask = self._attention_mask[:, first:]
        for layer in self._cache.layers:
            layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]


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
    depend on the other prompts in the batch. Rows stay in the batch until the end: a
    :class:`DecodeBatch` whose rows all start together and never leave.
    """
    prompt_options = _per_prompt(options, len(prompts), "options")
    batch = DecodeBatch(model, pad_token_id=pad_token_id, stop_token_ids=stop_token_ids, stop_strings=stop_strings)
    rows = batch.add(
        prompts, prompt_options, _per_prompt(generator, len(prompts), "generators"), [num_return_sequences] * len(prompts)
    )
    for step in range(max(option.max_new_tokens for option in prompt_options)):
        if step > 0:
            local_done = all(row.finish_reason is not None for row in rows)
            if all_finished(local_done) if all_finished is not None else local_done:
                return
        batch.step()
        yield rows


def _per_prompt(value, prompt_count: int, what: str) -> list:
    """``value`` for every prompt: the one value repeated, or the one given per prompt."""
    if value is None or not isinstance(value, Sequence):
        return [value] * prompt_count
    if len(value) != prompt_count:
        raise ConfigError(f"{len(value)} {what} for {prompt_count} prompts: expected one for all prompts or one per prompt")
    return list(value)


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


def _seen_tokens(token_lists: list[list[int]], vocabulary_size: int, device: torch.device) -> torch.Tensor:
    """Rows x vocabulary: whether each token occurs in each list."""
    seen = torch.zeros((len(token_lists), vocabulary_size), dtype=torch.bool, device=device)
    for index, token_ids in enumerate(token_lists):
        seen[index, torch.tensor(token_ids, dtype=torch.long, device=device)] = True
    return seen


def _join_left_padded(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Two attention masks stacked, the narrower padded on the left (with 0, hidden) to the wider one's width."""
    width = max(first.shape[1], second.shape[1])
    return torch.cat([torch.nn.functional.pad(mask, (width - mask.shape[1], 0)) for mask in (first, second)])


def _join_caches(cache, joining) -> None:
    """Put ``joining``'s rows after ``cache``'s, in place; the shorter side is padded on the left
    with zeros, which the attention mask hides."""
    for layer, new in zip(cache.layers, joining.layers):
        for name in ("keys", "values"):
            parts = [getattr(layer, name), getattr(new, name)]
            total = max(part.shape[2] for part in parts)
            padded = [torch.nn.functional.pad(part, (0, 0, total - part.shape[2], 0)) for part in parts]
            setattr(layer, name, torch.cat(padded))


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
