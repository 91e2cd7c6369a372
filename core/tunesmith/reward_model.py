"""A reward model that ``tunesmith rm`` trained, loaded to score prompts with their completions.

``tunesmith score`` scores a file's rows with it, and the ``rm:PATH`` reward scores completions
during reinforcement learning. Both render a prompt and its completion with the chat template
exactly as training did and take the score head's output at the last token.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tunesmith.errors import ConfigError


def is_adapter_folder(path: str | Path) -> bool:
    """Whether ``path`` holds a peft adapter and no full model: a LoRA/DoRA run's OUTPUT/final."""
    folder = Path(path).expanduser()
    return (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file()


def load_reward_model(
    model: str, runtime, adapter_path: Path | None = None, trust_remote_code: bool = False, given_as: str | None = None
):
    """The reward model (a score head on its base, with an optional peft adapter) and its tokenizer, on the runtime's device.

    ``given_as`` is how the user named it, for errors (``--reward rm:PATH``); by default they
    name the ``--model`` or ``--adapter`` option.
    """
    from tunesmith.data.tokenize import ensure_chat_template
    from tunesmith.device import PRECISION_DTYPES
    from tunesmith.models import load_model, load_tokenizer, resolve_model

    model_path = resolve_model(model)
    if adapter_path is None:
        architectures = json.loads((model_path / "config.json").read_text(encoding="utf-8")).get("architectures") or []
        if not any(name.endswith("ForSequenceClassification") for name in architectures):
            hint = "" if given_as else ", or its base with --adapter OUTPUT/final"
            raise ConfigError(
                f"{given_as or f'--model {model}'}: not a reward model (its architectures are {', '.join(architectures) or 'not named'}); "
                f"give the folder a 'tunesmith rm' run wrote (OUTPUT/final){hint}"
            )
    else:
        adapter_config = json.loads((adapter_path / "adapter_config.json").read_text(encoding="utf-8"))
        if adapter_config.get("task_type") != "SEQ_CLS":
            raise ConfigError(
                f"{given_as or f'--adapter {adapter_path}'}: not a reward model's adapter (task type {adapter_config.get('task_type')!r}, "
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


def pair_sample(tokenizer, prompt: list[dict[str, str]], completion: list[dict[str, str]], max_length: int):
    """The prompt and its completion as one sample, rendered by the chat template as 'tunesmith rm' trained
    on them; a sequence longer than ``max_length`` loses the start of its prompt."""
    from tunesmith.data.tokenize import tokenize_prompt_and_responses
    from tunesmith.data.types import Sample

    prompt_ids, (completion_ids,) = tokenize_prompt_and_responses(tokenizer, prompt, [completion])
    input_ids = (prompt_ids + completion_ids)[-max_length:]
    return Sample(input_ids, list(input_ids))


def score_samples(model, samples: list, pad_token_id: int, target) -> list[float]:
    """The reward model's score of each sample, in one forward pass without gradients on ``target``."""
    import torch

    from tunesmith.data.collate import collate_causal
    from tunesmith.models import sequence_scores

    batch = collate_causal([[sample] for sample in samples], pad_token_id)
    batch = {key: value.to(target) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}
    with torch.no_grad():
        return sequence_scores(model, batch).tolist()


def as_messages(turns: Any, role: str) -> list[dict[str, str]]:
    """A prompt or completion as chat messages: a string becomes one message from ``role``."""
    return [{"role": role, "content": turns}] if isinstance(turns, str) else list(turns)


class RewardModelScorer:
    """A reward function ``fn(prompts, completions, **columns)`` scoring with a loaded reward model.

    Prompts and completions are strings (a user message and the assistant's reply) or lists
    of chat messages; they are scored ``batch_size`` at a time.
    """

    def __init__(self, model, tokenizer, runtime, batch_size: int = 8, max_length: int = 2048):
        self.model, self.tokenizer, self.batch_size, self.max_length = model, tokenizer, batch_size, max_length
        self.target = runtime.device.setup(0)

    def __call__(self, prompts, completions, **columns) -> list[float]:
        samples = [
            pair_sample(self.tokenizer, as_messages(prompt, "user"), as_messages(completion, "assistant"), self.max_length)
            for prompt, completion in zip(prompts, completions, strict=True)
        ]
        scores: list[float] = []
        for start in range(0, len(samples), self.batch_size):
            scores += score_samples(self.model, samples[start : start + self.batch_size], self.tokenizer.pad_token_id, self.target)
        return scores
