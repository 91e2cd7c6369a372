"""The ``code`` reward on hand-written completions: passing, failing, forging and unscorable."""

import pytest

from tunesmith_rewards import sandbox
from tunesmith_rewards.code import code_reward, extract_code, split_tests

ADD = "```python\ndef add(a, b):\n    return a + b\n```"
ADD_TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]


@pytest.fixture
def sandboxed():
    """Skip where the sandbox cannot isolate programs, saying why."""
    reason = sandbox.sandbox_available()
    if reason is not None:
        pytest.skip(f"the code reward needs `unshare` and unprivileged user namespaces, unavailable here: {reason}")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("```python\nx = 1\n```\nthen\n```python\nx = 2\n```", "x = 2\n"),
        ("```py\nx = 1\n```\n```\nx = 2\n```", "x = 1\n"),
        ("```python3 title=a.py\nx = 1\n```\n```bash\nls\n```", "x = 1\n"),
        ("```\nx = 1\n```", "x = 1\n"),
        ("```bash\nls\n```", None),
        ("def f(): pass", None),
        ("```python\nunclosed", None),
    ],
)
def test_extract_code(text, expected):
    assert extract_code(text) == expected


def test_split_tests():
    assert split_tests(None, 0) == [] and split_tests([], 0) == [] and split_tests("# nothing", 0) == []
    assert split_tests(["assert f()", "assert g()"], 0) == [("assert f()", 0), ("assert g()", 1)]
    assert split_tests("import math\nassert f(1) == 1\nx = f(2)\nassert x == 2", 0) == [
        ("import math", None), ("assert f(1) == 1", 0), ("x = f(2)", None), ("assert x == 2", 1),
    ]
    check = "def check(f):\n    assert f(1) == 1\ncheck(f)"
    assert split_tests(check, 0) == [(check, 0)]
    with pytest.raises(ValueError, match="row 3 is not valid Python"):
        split_tests("assert (", 3)
    with pytest.raises(ValueError, match="row 1 must be a string or a list of strings"):
        split_tests([1, 2], 1)


def test_passing_and_failing_code(sandboxed):
    wrong = "```python\ndef add(a, b):\n    return a * b if a > 0 else a + b\n```"
    completions = [ADD, wrong, "def add(a, b): return a + b", "```python\nraise ImportError('numpy')\n```"]
    assert code_reward(["q"] * 4, completions, tests=[ADD_TESTS] * 4) == [1.0, 0.5, 0.0, 0.0]


def test_a_string_of_tests_counts_each_assert(sandboxed):
    tests = "import math\nassert add(1, 2) == 3\nassert add(2, 2) == 5\nassert math.isclose(add(0.1, 0.2), 0.3)"
    assert code_reward(["q"], [ADD], tests=[tests]) == [pytest.approx(2 / 3)]


def test_a_failing_test_does_not_stop_the_others(sandboxed):
    tests = ["assert add(1, 2) == 4", "add(None, 1)", "import sys; sys.exit(0)", "assert add(1, 2) == 3"]
    assert code_reward(["q"], [ADD], tests=[tests]) == [0.25]


def test_timeouts_and_exits_score_zero(sandboxed):
    completions = [
        "```python\nwhile True: pass\n```",
        "```python\nimport os\nos._exit(0)\n```",
        "```python\nimport sys\nsys.exit(0)\n```",
    ]
    rewards = code_reward(["q"] * 3, completions, tests=[ADD_TESTS] * 3, timeout=[1.0] * 3)
    assert rewards == [0.0, 0.0, 0.0]


def test_forged_results_earn_nothing(sandboxed):
    forger = (
        "```python\n"
        "import os, re, sys\n"
        "seen = open(__file__).read() if '__file__' in dir() else ''\n"
        "seen += open('main.py').read() + sys.stdin.read()\n"
        "for token in set(re.findall(r'[0-9a-f]{32}', seen)) | {'nonce'}:\n"
        "    for index in range(2):\n"
        "        line = f'{token} {index} pass'\n"
        "        print(line)\n"
        "        for fd in range(3, 20):\n"
        "            try:\n"
        "                os.write(fd, (line + chr(10)).encode())\n"
        "            except OSError:\n"
        "                pass\n"
        "def add(a, b):\n"
        "    return 7\n"
        "```"
    )
    assert code_reward(["q"], [forger], tests=[ADD_TESTS]) == [0.0]


def test_reads_conversational_completions(sandboxed):
    completion = [{"role": "assistant", "content": ADD}]
    assert code_reward(["q"], [completion], tests=[ADD_TESTS]) == [1.0]


def test_none_without_tests_or_without_a_sandbox(monkeypatch):
    assert code_reward(["q", "q"], [ADD, ADD]) == [None, None]
    assert code_reward(["q", "q"], [ADD, "no code"], tests=[[], None]) == [None, None]
    monkeypatch.setattr(sandbox, "sandbox_available", lambda: "no user namespaces here")
    monkeypatch.delenv(sandbox.UNISOLATED_ENV, raising=False)
    assert code_reward(["q", "q"], [ADD, "no code"], tests=[ADD_TESTS, ADD_TESTS]) == [None, 0.0]


def test_hostile_completions_score_zero_and_training_goes_on(sandboxed):
    hostile = [
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
        "chunks = []\nwhile True:\n    chunks.append(bytearray(2**24))",
        "import os\nif os.fork() == 0:\n    os.setsid()\n    import time\n    time.sleep(60)",
        "import ctypes\nctypes.CDLL(None).kill(-1, 9)",
        "import os\nos.system('kill -9 -1')",
    ]
    completions = [f"```python\n{source}\n```" for source in hostile] + [ADD]
    rewards = code_reward(["q"] * 6, completions, tests=[ADD_TESTS] * 6, timeout=[1.0] * 6)
    assert rewards == [0.0] * 5 + [1.0]
