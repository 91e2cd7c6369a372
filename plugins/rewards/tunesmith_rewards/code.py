"""The ``code`` reward: the fraction of a row's tests that the Python in a completion passes.

The completion's code is its last fenced block tagged ``python`` (or ``py``, ``python3``), else its
last untagged fenced block. It runs in :mod:`tunesmith_rewards.sandbox` as a module named
``solution`` (so an ``if __name__ == "__main__":`` block does not run), then the row's tests run one
by one in the same namespace, each inside ``try``, so one failing test does not hide the others.

The ``tests`` column holds, per row, either a list of strings, each one test, or one string of
Python, in which each top-level ``assert`` is a test and every other statement (imports, helpers,
``x = f(3)``) runs in its place without counting; a string without a top-level ``assert`` is one
test, passed when it runs without an exception. The program's own output goes to ``/dev/null``;
each test's result is written to the real standard output on a line that starts with a random
nonce the program never sees in its source, so printing ``PASS`` earns nothing. That stops forged
output, not code written against the harness itself: the tests run in the program's own
interpreter, where it can replace builtins or return objects equal to everything.
"""

from __future__ import annotations

import ast
import logging
import os
import re
import secrets
from concurrent.futures import ThreadPoolExecutor
from functools import cache

from tunesmith_rewards.completions import completion_text
from tunesmith_rewards.sandbox import run_python

#: seconds each completion may run, with its tests, when the dataset has no ``timeout`` column
DEFAULT_TIMEOUT = 10.0
#: how many completions run at once
MAX_WORKERS = min(4, os.cpu_count() or 1)

FENCED_BLOCK = re.compile(r"```([^\n`]*)\n(.*?)```", re.DOTALL)
PYTHON_TAGS = {"python", "py", "python3"}
# Runs in the sandbox after SOLUTION and UNITS are defined: the nonce arrives on standard input.
# Names the solution might rebind (compile, exec, os.write) are bound as defaults beforehand.
HARNESS = '''
import os as _os, sys as _sys, traceback as _traceback


def _run(solution, units, nonce, _compile=compile, _exec=exec, _write=_os.write, _print_exc=_traceback.print_exc):
    results = _os.dup(1)
    _os.dup2(_os.open(_os.devnull, _os.O_WRONLY), 1)
    namespace = {"__name__": "solution", "__builtins__": __builtins__}
    try:
        _exec(_compile(solution, "solution.py", "exec"), namespace)
    except BaseException:
        _print_exc()
        return
    for index, (test, scored) in enumerate(units):
        try:
            _exec(_compile(test, f"test_{index}.py", "exec"), namespace)
            passed = True
        except BaseException:
            _print_exc()
            passed = False
        if scored is not None:
            _write(results, f"{nonce} {scored} {'pass' if passed else 'fail'}\\n".encode())


_run(SOLUTION, UNITS, _sys.stdin.readline().strip())
'''

logger = logging.getLogger(__name__)


def extract_code(text: str) -> str | None:
    """The last fenced block tagged as Python, else the last untagged one, else ``None``."""
    blocks = [(info.strip().split(" ")[0].casefold(), body) for info, body in FENCED_BLOCK.findall(text)]
    for wanted in (PYTHON_TAGS, {""}):
        tagged = [body for tag, body in blocks if tag in wanted]
        if tagged:
            return tagged[-1]
    return None


def split_tests(tests, row: int) -> list[tuple[str, int | None]]:
    """A row's tests as ``(source, index)`` pairs run in order: ``index`` numbers the scored ones
    from 0 and is ``None`` for the statements that run without counting. Empty when there are none."""
    if tests is None:
        return []
    if isinstance(tests, str):
        try:
            statements = ast.parse(tests).body
        except SyntaxError as error:
            raise ValueError(f"the `tests` column of row {row} is not valid Python: {error}") from None
        if not any(isinstance(s, ast.Assert) for s in statements):
            return [(tests, 0)] if statements else []
        units, scored = [], 0
        for statement in statements:
            if isinstance(statement, ast.Assert):
                units.append((ast.unparse(statement), scored))
                scored += 1
            else:
                units.append((ast.unparse(statement), None))
        return units
    if not all(isinstance(test, str) for test in tests):
        raise ValueError(f"the `tests` column of row {row} must be a string or a list of strings, got {tests!r}")
    return [(test, index) for index, test in enumerate(tests)]


def score(code: str, units: list[tuple[str, int | None]], timeout: float) -> float | None:
    """The fraction of scored tests that ``code`` passes in the sandbox: 0.0 when it times out,
    ``None`` when the sandbox could not run it."""
    nonce = secrets.token_hex(16)
    program = f"SOLUTION = {code!r}\nUNITS = {units!r}\n{HARNESS}"
    result = run_python(program, stdin=nonce + "\n", timeout=timeout)
    if result.infrastructure_error is not None:
        _warn(result.infrastructure_error)
        return None
    if result.returncode is None:  # it did not finish: timed out
        return 0.0
    passed = set(re.findall(rf"^{nonce} (\d+) pass$", result.stdout, re.MULTILINE))
    total = sum(index is not None for _, index in units)
    return len(passed) / total


def code_reward(prompts, completions, tests=None, timeout=None, **columns) -> list[float | None]:
    """The fraction of the row's ``tests`` that the completion's Python passes, run in the sandbox.

    0.0 when the completion has no fenced code block, or its code crashes or runs past the
    timeout (the ``timeout`` column in seconds, else :data:`DEFAULT_TIMEOUT`). ``None`` for every
    completion when the dataset has no ``tests`` column, where a row's tests are empty, and where
    the sandbox could not run the code (unavailable here, or failed to start).
    """
    if tests is None:
        return [None] * len(completions)
    timeouts = timeout if timeout is not None else [None] * len(completions)
    rewards: list[float | None] = [None] * len(completions)
    jobs = {}
    for row, (completion, row_tests, row_timeout) in enumerate(zip(completions, tests, timeouts, strict=True)):
        units = split_tests(row_tests, row)
        if not units:
            continue
        code = extract_code(completion_text(completion))
        if code is None:
            rewards[row] = 0.0
            continue
        jobs[row] = (code, units, DEFAULT_TIMEOUT if row_timeout is None else float(row_timeout))
    with ThreadPoolExecutor(max_workers=MAX_WORKERS) as pool:
        for row, reward in zip(jobs, pool.map(lambda job: score(*job), jobs.values()), strict=True):
            rewards[row] = reward
    return rewards


@cache
def _warn(error: str) -> None:
    logger.warning("the code reward could not run a completion and scores it None: %s", error)
