"""How the NPU distribution points the conformance suite at itself, and the stand-ins for the
Ascend hardware this machine lacks.

``pytest_plugins = ["tunesmith.testing"]`` is declared in ``test_npu_conformance.py`` rather
than here, as the fake device does, so that this directory also runs when collected from the
tunesmith repo, where a nested conftest may not load plugins.

The hardware is faked at the narrowest seam: the ``torch_npu`` module itself. ``fake_npu``
installs a module object built here in ``sys.modules`` (with a ``__spec__``, so that the real
``importlib.util.find_spec`` finds it) and sets ``torch.npu`` to its ``npu`` namespace, as the
real package does on import. Everything else (the plugin's probe and device, tunesmith's
plugin manager and runtime, torch itself) is the real code. No ``npu`` device type is
registered with torch: that would last for the rest of the process.
"""

from __future__ import annotations

import importlib.machinery
import sys
import types

import pytest
import torch

from tunesmith.plugins import ALLOW_LIST_VARIABLE, create_plugin_manager

#: imported only while a stand-in torch_npu is installed, and forgotten with it
DEVICE_MODULE = "tunesmith_npu.device"
MiB = 1024**2


class FakeAscendRuntime:
    """What torch_npu puts at ``torch.npu``, limited to the functions the plugin calls, backed by the CPU.

    ``count`` is the number of devices the runtime reports (a test sets it); ``calls`` lists, in
    order, every call that asks the runtime or the hardware something, so a test can see what
    the plugin asked; the NPU's random generator is a CPU ``torch.Generator``. The optional
    queries a torch_npu version may lack (``is_bf16_supported``, ``get_device_name``) are
    instance attributes, so a test can delete them.
    """

    def __init__(self, count: int = 2, device_name: str = "Ascend910B3", computes_bf16: bool = True):
        self.count = count
        self.calls: list[str] = []
        self.allocated = 3 * MiB
        self.peak = 5 * MiB
        self.generator = torch.Generator()
        self.get_device_name = lambda: device_name
        self.is_bf16_supported = lambda: computes_bf16

    def device_count(self) -> int:
        self.calls.append("device_count")
        return self.count

    def set_device(self, index: int) -> None:
        self.calls.append(f"set_device:{index}")

    def synchronize(self) -> None:
        self.calls.append("synchronize")

    def memory_allocated(self) -> int:
        return self.allocated

    def max_memory_allocated(self) -> int:
        return self.peak

    def empty_cache(self) -> None:
        self.calls.append("empty_cache")

    def manual_seed_all(self, seed: int) -> None:
        self.calls.append(f"manual_seed_all:{seed}")
        self.generator.manual_seed(seed)

    def get_rng_state(self) -> torch.Tensor:
        return self.generator.get_state()

    def set_rng_state(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)


def forget_device_module(monkeypatch) -> None:
    """Let the next import of the device module run afresh, against whatever torch_npu is installed now."""
    monkeypatch.delitem(sys.modules, DEVICE_MODULE, raising=False)


@pytest.fixture
def fake_npu(monkeypatch):
    """A stand-in torch_npu reporting two visible NPUs; yields its ``torch.npu`` namespace."""
    runtime = FakeAscendRuntime()
    module = types.ModuleType("torch_npu", "A stand-in for torch_npu, built by the tests.")
    module.__spec__ = importlib.machinery.ModuleSpec("torch_npu", loader=None)
    module.npu = runtime
    monkeypatch.setitem(sys.modules, "torch_npu", module)
    monkeypatch.setattr(torch, "npu", runtime, raising=False)
    forget_device_module(monkeypatch)
    yield runtime
    # A device module imported against the stand-in must not outlive it: without torch_npu, importing it has to fail.
    sys.modules.pop(DEVICE_MODULE, None)


@pytest.fixture
def torch_npu_missing(monkeypatch):
    """torch_npu hidden as if not installed (even where it is): find_spec answers None and importing it fails."""
    monkeypatch.setitem(sys.modules, "torch_npu", None)
    forget_device_module(monkeypatch)


@pytest.fixture
def broken_torch_npu(monkeypatch, tmp_path):
    """An installed torch_npu whose import fails as it does when the CANN libraries cannot be loaded."""
    package = tmp_path / "torch_npu"
    package.mkdir()
    (package / "__init__.py").write_text(
        'raise ImportError("libascendcl.so: cannot open shared object file: No such file or directory")\n', encoding="utf-8"
    )
    monkeypatch.delitem(sys.modules, "torch_npu", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    forget_device_module(monkeypatch)


@pytest.fixture
def tunesmith_device_name():
    return "npu"


@pytest.fixture
def tunesmith_plugin_manager(monkeypatch):
    # Opt in even where the allow-list hides plugins (the tunesmith repo's suite empties it).
    monkeypatch.setenv(ALLOW_LIST_VARIABLE, "tunesmith-npu")
    return create_plugin_manager()
