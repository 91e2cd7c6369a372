"""Reward functions for reinforcement-learning trainers: chosen with ``--reward``, checked, and run.

A reward function is ``fn(prompts, completions, **columns) -> list[float | None]``: one value
per completion, ``None`` where it cannot score one. ``completions`` are strings, or for
conversational prompts lists of messages (``[{"role": "assistant", "content": ...}]``); each
dataset column arrives as a keyword argument, a list aligned with ``completions``. A function
names the columns it needs as keyword parameters without a default; ``**columns`` takes the
rest (without it, a function gets only the columns it names).

``--reward`` takes one of::

    NAME                     a reward a plugin registered (tunesmith plugins lists them)
    module:function          a function of your own; the current directory is importable
    rm:PATH                  a reward model 'tunesmith rm' trained (its OUTPUT/final)

each optionally followed by ``:WEIGHT``, a number (default 1). A trailing ``:NUMBER`` is always
the weight: a path that itself ends in one is written with an explicit weight after it.

:class:`RewardRunner` runs every reward of a step at once, each in its own thread with a
timeout, and :meth:`RewardResult.totals` sums their weighted values per completion.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import math
import numbers
import os
import re
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

from tunesmith.errors import ConfigError, RewardError

logger = logging.getLogger(__name__)

#: what ``--reward`` accepts, for error messages
REWARD_SHAPES = "NAME, NAME:WEIGHT, module:function, module:function:WEIGHT, rm:PATH or rm:PATH:WEIGHT"
REWARD_MODEL_PREFIX = "rm:"
ERROR_POLICIES = ("raise", "skip")

_WEIGHT = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_NAME = re.compile(r"[a-z][a-z0-9_-]*")
_DOTTED = r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*"
_FUNCTION = re.compile(rf"{_DOTTED}:{_DOTTED}")


def parse_reward_option(value: str) -> tuple[str, float]:
    """``--reward VALUE`` as (what to load, weight): ``"accuracy:0.5"`` gives ``("accuracy", 0.5)``,
    ``"my_rewards:brevity"`` gives ``("my_rewards:brevity", 1.0)``, ``"rm:runs/rm/final:2"`` gives
    ``("rm:runs/rm/final", 2.0)``."""
    head, weight = value, 1.0
    before, colon, last = value.rpartition(":")
    if colon and _WEIGHT.fullmatch(last):
        head, weight = before, float(last)
        if not math.isfinite(weight):
            raise ConfigError(f"--reward {value}: the weight {last} is not a finite number")
    if head.startswith(REWARD_MODEL_PREFIX):
        if not head[len(REWARD_MODEL_PREFIX):]:
            raise ConfigError(f"--reward {value}: rm: needs the reward model's folder, as rm:PATH (the OUTPUT/final of 'tunesmith rm')")
        return head, weight
    if _NAME.fullmatch(head) or _FUNCTION.fullmatch(head):
        return head, weight
    raise ConfigError(
        f"--reward {value}: expected {REWARD_SHAPES} (a NAME is lowercase letters, digits, '-' or '_'; "
        "module and function are Python names; WEIGHT is a number)"
    )


@dataclass(frozen=True)
class Reward:
    """A loaded reward: its name (as given to ``--reward``, without the weight), weight and function,
    and the dataset columns the function needs (its keyword parameters without a default)."""

    name: str
    weight: float
    fn: Callable
    required_columns: tuple[str, ...]


def load_rewards(values: Sequence[str], manager, *, runtime=None) -> list[Reward]:
    """The rewards ``--reward`` names, in order, each function imported (or reward model loaded) now.

    A value is a reward some plugin registered in ``manager``, else ``module:function``
    imported with the current directory on ``sys.path``, else ``rm:PATH``, loaded onto
    ``runtime``'s device (from :func:`tunesmith.runtime.select_runtime`; the best available
    device when None).
    """
    rewards: list[Reward] = []
    for value in values:
        name, weight = parse_reward_option(value)
        if any(reward.name == name for reward in rewards):
            raise ConfigError(f"--reward {value}: {name} is given twice; give each reward once, with its weight")
        if name.startswith(REWARD_MODEL_PREFIX):
            if runtime is None:
                from tunesmith.runtime import select_runtime

                runtime = select_runtime(manager)
            fn = _load_reward_model(name[len(REWARD_MODEL_PREFIX):], runtime, value)
        elif ":" in name:
            fn = _import_function(name, value, manager)
        else:
            fn = _registered(name, manager, value)
        rewards.append(Reward(name, weight, fn, _required_columns(fn, value)))
    return rewards


def _registered(name: str, manager, value: str) -> Callable:
    registered = manager.collect("reward")
    if name not in registered:
        installed = ", ".join(sorted(registered)) or "none (the built-in ones come with tunesmith-rewards: is it installed, and allowed by TUNESMITH_PLUGINS?)"
        raise ConfigError(
            f"--reward {value}: no reward named {name!r} is installed; installed rewards: {installed}. "
            "A function of your own is given as module:function"
        )
    fn = registered[name].load()
    if not callable(fn):
        raise ConfigError(f"--reward {value}: {registered[name].spec.fn!r} (from {registered[name].plugin}) is not a function")
    return fn


def _import_function(name: str, value: str, manager) -> Callable:
    module_name, _, attribute = name.partition(":")
    directory = os.getcwd()
    if directory not in sys.path:
        sys.path.insert(0, directory)
    try:
        obj = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name is None or not f"{module_name}.".startswith(f"{error.name}."):  # a module it imports is missing
            raise ConfigError(f"--reward {value}: importing {module_name} failed: {error!r}") from error
        raise ConfigError(
            f"--reward {value}: no module named {error.name!r} in the current directory ({directory}) "
            f"or the installed packages{_weight_hint(module_name, manager)}"
        ) from None
    except Exception as error:
        raise ConfigError(f"--reward {value}: importing {module_name} failed: {error!r}") from error
    for part in attribute.split("."):
        if not hasattr(obj, part):
            raise ConfigError(
                f"--reward {value}: {module_name} ({getattr(obj, '__file__', module_name)}) has no {attribute!r}"
                f"{_weight_hint(module_name, manager)}"
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"--reward {value}: {attribute} in {module_name} is a {type(obj).__name__}, not a function")
    return obj


def _weight_hint(module_name: str, manager) -> str:
    """For ``accuracy:high``, read as module:function: say that a weight is a number."""
    if module_name not in manager.collect("reward"):
        return ""
    return f" ({module_name} is an installed reward; its weight is a number, as in {module_name}:0.5)"


def _load_reward_model(path: str, runtime, value: str) -> Callable:
    from pathlib import Path

    from tunesmith.adapters import base_model
    from tunesmith.reward_model import RewardModelScorer, is_adapter_folder, load_reward_model

    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"--reward {value}: {path} is not a folder; expected a reward model, the OUTPUT/final of a 'tunesmith rm' run")
    if is_adapter_folder(folder):  # a LoRA run's OUTPUT/final: the base comes from its run
        model, tokenizer = load_reward_model(base_model(None, folder), runtime, folder, given_as=f"--reward {value}")
    elif (folder / "config.json").is_file():
        model, tokenizer = load_reward_model(path, runtime, given_as=f"--reward {value}")
    else:
        raise ConfigError(
            f"--reward {value}: {path} holds neither a model (config.json) nor an adapter (adapter_config.json); "
            "expected the OUTPUT/final of a 'tunesmith rm' run"
        )
    return RewardModelScorer(model, tokenizer, runtime)


def _required_columns(fn: Callable, value: str) -> tuple[str, ...]:
    """The keyword parameters after ``prompts`` and ``completions`` that have no default."""
    try:
        parameters = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # a builtin without a signature: assume it takes what it is given
        return ()
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) < 2 and not any(p.kind is p.VAR_POSITIONAL for p in parameters):
        raise ConfigError(
            f"--reward {value}: the function takes {inspect.signature(fn)}; "
            "expected fn(prompts, completions, **columns) returning one float or None per completion"
        )
    named = positional[2:] + [p for p in parameters if p.kind is p.KEYWORD_ONLY]
    return tuple(p.name for p in named if p.default is p.empty)


def _accepted_columns(fn: Callable) -> set[str] | None:
    """The column names ``fn`` accepts as keywords; None when it takes any (``**columns``)."""
    try:
        parameters = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return None
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return {p.name for p in positional[2:] + [p for p in parameters if p.kind is p.KEYWORD_ONLY]}


def check_reward_columns(rewards: Sequence[Reward], columns: Iterable[str], source: str) -> None:
    """Refuse, before any step, a reward needing a column the data ``source`` does not have."""
    have = set(columns)
    for reward in rewards:
        missing = [column for column in reward.required_columns if column not in have]
        if missing:
            raise ConfigError(
                f"--reward {reward.name} needs the column{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))}, "
                f"which {source} does not have; its columns are {', '.join(sorted(have)) or 'none'}"
            )


@dataclass
class RewardResult:
    """One call's values by reward name (one per completion, None where unscored), the seconds
    each reward took, and how many completions each left unscored because it timed out or
    because it failed under ``errors="skip"``."""

    values: dict[str, list[float | None]]
    seconds: dict[str, float]
    timed_out: dict[str, int]
    errors_skipped: dict[str, int]

    def totals(self, rewards: Sequence[Reward]) -> list[float | None]:
        """Per completion, the weighted sum over the rewards that scored it; None where none did."""
        count = len(next(iter(self.values.values()), []))
        totals: list[float | None] = []
        for index in range(count):
            scored = [(reward.weight, self.values[reward.name][index]) for reward in rewards]
            scored = [weight * value for weight, value in scored if value is not None]
            totals.append(math.fsum(scored) if scored else None)
        return totals


class _Call:
    """One reward's run over one batch, in its own daemon thread: a hung scorer never blocks
    the interpreter's exit (a ThreadPoolExecutor's workers are joined at exit)."""

    def __init__(self, reward: Reward, prompts, completions, columns: dict[str, list], diagnose: bool):
        self.reward, self.prompts, self.completions, self.columns, self.diagnose = reward, prompts, completions, columns, diagnose
        self.result: Any = None
        self.error: BaseException | None = None
        self.failing_row: int | None = None
        self.seconds = 0.0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"reward {reward.name}", daemon=True)

    def _run(self) -> None:
        started = time.perf_counter()
        try:
            self.result = self.reward.fn(self.prompts, self.completions, **self.columns)
        except BaseException as error:
            self.error = error
            if self.diagnose:
                self.failing_row = self._first_failing_row()
        finally:
            self.seconds = time.perf_counter() - started
            self.done.set()

    def _first_failing_row(self) -> int | None:
        """The first completion the function raises on by itself, found by calling it row by row."""
        for index in range(len(self.completions)):
            row_columns = {name: values[index : index + 1] for name, values in self.columns.items()}
            try:
                self.reward.fn(self.prompts[index : index + 1], self.completions[index : index + 1], **row_columns)
            except Exception:
                return index
        return None


class RewardRunner:
    """Runs rewards over a batch of completions, all at once, each in its own thread.

    ``timeout`` (seconds, or None for none) bounds each reward's call: a reward that has not
    returned by then leaves its completions unscored (None), and until that call returns the
    reward is not started again (its later batches are unscored too), so a hung scorer costs
    one thread, not one per step. A reward that raises, returns other than one number (or None)
    per completion, or a non-finite number other than NaN (which means None) fails the call with
    a :class:`~tunesmith.errors.RewardError` under ``errors="raise"``; under ``errors="skip"`` its
    completions are left unscored and counted.
    """

    def __init__(self, rewards: Sequence[Reward], timeout: float | None, errors: str = "raise"):
        if timeout is not None and not timeout > 0:
            raise ConfigError(f"--reward-timeout {timeout}: expected a number of seconds above 0")
        if errors not in ERROR_POLICIES:
            raise ConfigError(f"--reward-errors {errors}: expected one of {', '.join(ERROR_POLICIES)}")
        self.rewards, self.timeout, self.errors = list(rewards), timeout, errors
        self._accepted = {reward.name: _accepted_columns(reward.fn) for reward in self.rewards}
        self._running: dict[str, _Call] = {}
        self._warned: set[str] = set()

    def __call__(self, prompts: list, completions: list, columns: dict[str, list], rows: list[str]) -> RewardResult:
        count = len(completions)
        lengths = {"prompts": len(prompts), "rows": len(rows), **{f"column {name!r}": len(values) for name, values in columns.items()}}
        uneven = {what: length for what, length in lengths.items() if length != count}
        if uneven:
            raise ValueError(f"{count} completions but {', '.join(f'{length} {what}' for what, length in uneven.items())}")
        started = time.perf_counter()
        calls: dict[str, _Call | None] = {}
        for reward in self.rewards:
            previous = self._running.get(reward.name)
            if previous is not None and not previous.done.is_set():
                calls[reward.name] = None  # still running past an earlier timeout
                continue
            accepted = self._accepted[reward.name]
            given = columns if accepted is None else {name: values for name, values in columns.items() if name in accepted}
            call = calls[reward.name] = _Call(reward, prompts, completions, given, diagnose=self.errors == "raise")
            self._running[reward.name] = call
            call.thread.start()
        result = RewardResult({}, {}, {}, {})
        for reward in self.rewards:
            call = calls[reward.name]
            if call is not None:
                remaining = None if self.timeout is None else max(0.0, started + self.timeout - time.perf_counter())
                call.done.wait(remaining)
            # A call that raised but is still searching for its first failing row has failed, not timed out.
            if call is None or not (call.done.is_set() or call.error is not None):
                result.values[reward.name] = [None] * count
                result.seconds[reward.name] = time.perf_counter() - started
                result.timed_out[reward.name], result.errors_skipped[reward.name] = count, 0
                continue
            result.seconds[reward.name] = call.seconds if call.done.is_set() else time.perf_counter() - started
            result.timed_out[reward.name] = 0
            try:
                result.values[reward.name] = self._values(call, rows)
                result.errors_skipped[reward.name] = 0
            except RewardError as error:
                if self.errors == "raise":
                    raise
                if reward.name not in self._warned:
                    self._warned.add(reward.name)
                    logger.warning("%s; its completions are left unscored (--reward-errors skip), now and whenever it fails again", error)
                result.values[reward.name] = [None] * count
                result.errors_skipped[reward.name] = count
        return result

    def _values(self, call: _Call, rows: list[str]) -> list[float | None]:
        """The call's values, checked: one number or None per completion, NaN read as None."""
        name, count = call.reward.name, len(call.completions)
        if call.error is not None:
            where = f"row {rows[call.failing_row]}" if call.failing_row is not None else f"a batch of rows {_rows_text(rows)}"
            raise RewardError(f"reward {name} raised {call.error!r} on {where}") from call.error
        if isinstance(call.result, (str, bytes)) or not isinstance(call.result, Sequence):
            raise RewardError(f"reward {name} returned {type(call.result).__name__}, expected a list of {count} floats (or None)")
        if len(call.result) != count:
            raise RewardError(f"reward {name} returned {len(call.result)} values for {count} completions (rows {_rows_text(rows)})")
        values: list[float | None] = []
        for index, value in enumerate(call.result):
            if value is not None and not isinstance(value, numbers.Real):
                raise RewardError(f"reward {name} returned {value!r} for row {rows[index]}, expected a float or None")
            if value is None or math.isnan(value):
                values.append(None)
            elif math.isinf(value):
                raise RewardError(f"reward {name} returned {value!r} for row {rows[index]}, expected a finite number (or None)")
            else:
                values.append(float(value))
        return values


def _rows_text(rows: list[str]) -> str:
    """Each distinct row once, in order (a prompt's completions share its row)."""
    return ", ".join(dict.fromkeys(rows))
