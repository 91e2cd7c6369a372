"""tunesmith models in lm-evaluation-harness: the ``tunesmith`` model type.

Importing this module registers :class:`TunesmithLM` with lm-eval (0.4.x) as the model type
``tunesmith``. lm-eval finds third-party model types only in its own registry, which nothing
outside it fills unless imported, so ``python -m tunesmith.lm_eval`` is lm-eval's command
line with this module imported first::

    python -m tunesmith.lm_eval run --model tunesmith --model_args model=smollm2-135m,adapter=runs/sft/final \\
        --tasks my_task --include_path my_tasks/

and ``tunesmith eval --lm-eval-tasks`` runs lm-eval's tasks with the model it loaded
(:func:`find_tasks`, :func:`run_tasks`). In Python, ``import tunesmith.lm_eval`` before
``lm_eval.simple_evaluate(model="tunesmith", ...)``. lm-eval is an optional dependency
(``pip install 'tunesmith[lm-eval]'``); importing this module without it is a
:class:`~tunesmith.errors.ConfigError` that says so.

The model is loaded as every tunesmith command loads one (``model`` a folder, Hub ID or alias;
``adapter`` a peft adapter folder; ``device`` and ``precision`` as ``--device`` and
``--precision`` take them). Requests are answered by tunesmith's own code: log-likelihoods by
:func:`tunesmith.losses.target_logps`, as training scores tokens; generations by
:func:`tunesmith.generation.generate_batch`, as ``infer`` generates them. Texts are tokenized
without special tokens and scored as lm-eval's ``hf`` model scores them (a context's trailing
spaces move to its continuation; an empty context is the tokenizer's bos token, else its eos).
"""

from __future__ import annotations

import importlib.util
import inspect
import math
from pathlib import Path
from typing import Any

from tunesmith.errors import ConfigError

if importlib.util.find_spec("lm_eval") is None:
    raise ConfigError(
        "running lm-evaluation-harness tasks needs the lm-eval package, which is not installed: pip install 'tunesmith[lm-eval]'"
    )

# lm-eval imports its built-in model types only when it looks one up in an empty registry;
# registering ours first would otherwise leave `hf` and the rest unknown.
import lm_eval.models  # noqa: F401
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from tunesmith.data.collate import collate_causal
from tunesmith.data.types import IGNORE_INDEX, Sample
from tunesmith.generation import GenerationOptions, generate_batch, pad_token_id
from tunesmith.losses import target_logps

MODEL_TYPE = "tunesmith"
DEFAULT_BATCH_SIZE = 8
#: tokens in one forward pass when the model's config gives no max_position_embeddings
FALLBACK_MAX_LENGTH = 2048
#: the ``generation_kwargs`` of a task that generation honours; ``until`` is handled apart
GENERATION_KWARGS = ("until", "max_gen_toks", "do_sample", "temperature", "top_p", "top_k", "repetition_penalty")


@register_model(MODEL_TYPE)
class TunesmithLM(TemplateLM):
    """A loaded model and its tokenizer, answering lm-eval's requests ``batch_size`` at a time.

    ``max_length`` bounds the tokens of one forward pass (default: the model's
    ``max_position_embeddings``); longer inputs lose their start. ``max_new_tokens`` is the
    generation length of a task that sets no ``max_gen_toks``.
    """

    def __init__(
        self,
        model,
        tokenizer,
        batch_size: int | str = DEFAULT_BATCH_SIZE,
        max_length: int | None = None,
        max_new_tokens: int = 256,
    ):
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        self.batch_size = _whole_number("batch_size", batch_size)
        self.max_length = _whole_number("max_length", max_length) if max_length is not None else _model_max_length(model)
        self.max_new_tokens = _whole_number("max_new_tokens", max_new_tokens)
        self._device = next(model.parameters()).device

    @classmethod
    def load(
        cls,
        model: str | None = None,
        adapter: str | None = None,
        device: str = "auto",
        precision: str = "auto",
        trust_remote_code: bool = False,
        batch_size: int | str = DEFAULT_BATCH_SIZE,
        max_length: int | None = None,
        max_new_tokens: int = 256,
    ) -> TunesmithLM:
        """Load ``model`` (with ``adapter``) as ``tunesmith eval`` does.

        Without ``model``, the adapter's recorded base model is loaded, else the default model.
        """
        from tunesmith.adapters import adapter_folder, base_model
        from tunesmith.models import load_for_inference
        from tunesmith.plugins import create_plugin_manager
        from tunesmith.runtime import select_runtime

        runtime = select_runtime(create_plugin_manager(), device, precision)
        adapter_path = adapter_folder(adapter, if_full_model="pass it as model= instead") if adapter is not None else None
        loaded, tokenizer = load_for_inference(base_model(model, adapter_path), runtime, adapter_path, trust_remote_code)
        return cls(loaded, tokenizer, batch_size, max_length, max_new_tokens)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> TunesmithLM:
        """What ``--model_args model=M,adapter=DIR`` builds."""
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any], additional_config: dict | None = None) -> TunesmithLM:
        """What ``--model_args`` given as a mapping builds, with lm-eval's ``--batch_size`` unless they set one.

        lm-eval's ``--device`` is not used: its command line passes ``cuda:0`` when not told
        otherwise, and the device is chosen as every tunesmith command chooses it (``device``
        in ``--model_args``, by default ``auto``).
        """
        batch_size = (additional_config or {}).get("batch_size")
        arguments = {**({"batch_size": batch_size} if batch_size is not None else {}), **arg_dict}
        accepted = inspect.signature(cls.load).parameters
        unknown = sorted(set(arguments) - set(accepted))
        if unknown:
            raise ConfigError(
                f"--model_args {', '.join(unknown)}: not taken by the tunesmith model; it takes {', '.join(accepted)}"
            )
        return cls.load(**arguments)

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return list(self.tokenizer(string, add_special_tokens=False)["input_ids"])

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        from tunesmith.data.tokenize import ensure_chat_template

        ensure_chat_template(self.tokenizer)
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False, add_generation_prompt=add_generation_prompt)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        answers = self._score([(context, continuation) for _, context, continuation in requests])
        for (texts, _, _), answer in zip(requests, answers, strict=True):
            self.cache_hook.add_partial("loglikelihood", texts, answer)
        return answers

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text's log-likelihood from its first token on, in windows of ``max_length`` tokens
        that each predict tokens no earlier window did, with as much context before them as fits."""
        windows, owners = [], []
        for index, request in enumerate(requests):
            (text,) = request.args
            for window in get_rolling_token_windows(
                self.tok_encode(text), self.prefix_token_id, self.max_length - 1, context_len=1
            ):
                windows.append(make_disjoint_window(window))
                owners.append(index)
        logps: list[list[float]] = [[] for _ in requests]
        for owner, (logp, _) in zip(owners, self._score(windows), strict=True):
            logps[owner].append(logp)
        totals = [math.fsum(values) for values in logps]
        for request, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Each context continued until one of its ``until`` strings (cut off), a stop token or
        ``max_gen_toks``; requests with the same generation settings are generated together."""
        groups: dict[tuple[GenerationOptions, tuple[str, ...]], list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(self._generation_settings(request.args[1]), []).append(index)
        replies: list[str] = [""] * len(requests)
        for (options, until), indices in groups.items():
            room = max(self.max_length - options.max_new_tokens, 1)
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                prompts = [(self.tok_encode(requests[i].args[0]) or [self.prefix_token_id])[-room:] for i in chunk]
                for i, completion in zip(
                    chunk, generate_batch(self.model, self.tokenizer, prompts, options, stop_strings=until), strict=True
                ):
                    replies[i] = completion.text
                    self.cache_hook.add_partial("generate_until", requests[i].args, completion.text)
        return replies

    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """Each continuation's summed log-probability after its context, and whether greedy
        decoding would produce it; longest first, so each batch pads little."""
        order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]), reverse=True)
        answers: list[tuple[float, bool]] = [(0.0, True)] * len(pairs)
        pad = pad_token_id(self.tokenizer)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            samples = [self._sample(*pairs[i]) for i in chunk]
            batch = collate_causal([[sample] for sample in samples], pad)
            with torch.no_grad():
                scored = target_logps(self.model, {key: _to(value, self._device) for key, value in batch.items()}, greedy=True)
            lengths = [sample.num_trained_tokens for sample in samples]
            for i, logps, greedy in zip(chunk, scored.logps.split(lengths), scored.greedy.split(lengths), strict=True):
                answers[i] = (math.fsum(logps.tolist()), bool(greedy.all()))
        return answers

    def _sample(self, context: list[int], continuation: list[int]) -> Sample:
        """Context and continuation as one sample whose targets are the continuation's tokens,
        the context cut from the left to fit ``max_length``."""
        if len(continuation) >= self.max_length:
            raise ConfigError(
                f"a continuation of {len(continuation)} tokens leaves no room for context in max_length {self.max_length}; "
                "give the tunesmith model a larger max_length"
            )
        tokens = (context + continuation)[-self.max_length :]
        return Sample(tokens, [IGNORE_INDEX] * (len(tokens) - len(continuation)) + continuation)

    def _generation_settings(self, gen_kwargs: dict[str, Any]) -> tuple[GenerationOptions, tuple[str, ...]]:
        """A task's ``generation_kwargs`` as generation options and stop strings."""
        unknown = sorted(set(gen_kwargs) - set(GENERATION_KWARGS))
        if unknown:
            raise ConfigError(
                f"generation_kwargs {', '.join(unknown)}: not supported by the tunesmith model; it takes {', '.join(GENERATION_KWARGS)}"
            )
        until = gen_kwargs.get("until") or ()
        sampled = bool(gen_kwargs.get("do_sample", False))
        options = GenerationOptions(
            max_new_tokens=int(gen_kwargs.get("max_gen_toks", self.max_new_tokens)),
            # as transformers reads them: without do_sample, greedy whatever the temperature
            temperature=float(gen_kwargs.get("temperature", 1.0)) if sampled else 0.0,
            top_p=float(gen_kwargs.get("top_p", 1.0)),
            top_k=int(gen_kwargs.get("top_k", 0)),
            repetition_penalty=float(gen_kwargs.get("repetition_penalty", 1.0)),
        )
        return options, (until,) if isinstance(until, str) else tuple(until)


def find_tasks(tasks: list[str], include: list[Path]):
    """An lm-eval task manager that knows every one of ``tasks`` (names or glob patterns), and
    the task names they match.

    The ``include`` folders of task YAML files are indexed first; lm-eval's thousands of
    built-in tasks (seconds to index) only when a task is not among them.
    """
    from lm_eval.tasks import TaskManager

    include_path = [str(folder) for folder in include] or None
    if include:
        manager = TaskManager(include_path=include_path, include_defaults=False)
        if all(manager.match_tasks([task]) for task in tasks):
            return manager, manager.match_tasks(tasks)
    manager = TaskManager(include_path=include_path)
    missing = [task for task in tasks if not manager.match_tasks([task])]
    if missing:
        where = f"{', '.join(map(str, include))} or lm-eval's built-in tasks" if include else "lm-eval's built-in tasks"
        raise ConfigError(
            f"--lm-eval-tasks {', '.join(missing)}: no such task in {where}; give a folder of task YAML files with "
            "--lm-eval-include, or see `lm-eval ls tasks`"
        )
    return manager, manager.match_tasks(tasks)


def run_tasks(model: TunesmithLM, manager, tasks: list[str]) -> dict[str, Any]:
    """lm-eval's results for ``tasks``: per task (and group) its metrics, and the versions and
    few-shot counts of the tasks, as ``lm-eval``'s own results file has them."""
    from lm_eval import simple_evaluate

    results = simple_evaluate(model=model, tasks=tasks, task_manager=manager, log_samples=False)
    return {key: results[key] for key in ("results", "groups", "versions", "n-shot", "higher_is_better") if key in results}


def _whole_number(name: str, value: int | str) -> int:
    """``value`` as a positive int (lm-eval passes its command line's ``--batch_size`` as text)."""
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number < 1:
        raise ConfigError(f"{name} {value!r}: expected a whole number of 1 or more")
    return number


def _model_max_length(model) -> int:
    config = model.config.get_text_config()
    return getattr(config, "max_position_embeddings", None) or FALLBACK_MAX_LENGTH


def _to(value, device: torch.device):
    return value.to(device) if isinstance(value, torch.Tensor) else value
