"""What both vLLM engines here are given: tunesmith's sampling options as vLLM's, and the engine
settings a device needs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tunesmith import GenerationOptions


def sampling_params(options: GenerationOptions, *, seed: int | None, stop: Sequence[str], stop_token_ids: list[int], **more: Any):
    """vLLM's ``SamplingParams`` for one sequence sampled as ``options`` say (``top_k`` 0, off, is
    vLLM's -1), ending at ``stop`` strings or ``stop_token_ids``; ``more`` adds vLLM's own."""
    from vllm import SamplingParams

    return SamplingParams(
        max_tokens=options.max_new_tokens,
        temperature=options.temperature,
        top_p=options.top_p,
        top_k=options.top_k or -1,
        repetition_penalty=options.repetition_penalty,
        seed=seed,
        stop=list(stop) or None,
        stop_token_ids=stop_token_ids,
        **more,
    )


def device_settings(device_name: str) -> dict[str, Any]:
    """Engine arguments for a tunesmith device: off CUDA, no compilation (vLLM's CPU build
    compiles through Triton, which a CPU machine seldom has)."""
    return {} if device_name == "cuda" else {"enforce_eager": True}
