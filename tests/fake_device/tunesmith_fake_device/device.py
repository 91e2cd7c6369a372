"""``FakeDevice``: the CPU pretending to be an accelerator, keeping a log of what it was asked.

Every method of :class:`tunesmith.device.Device` is overridden only to record its name and then
do what the CPU does, so results are real CPU results. ``setup`` records the local rank it was
given (``setup:1``), the device count is ``$TUNESMITH_FAKE_DEVICE_COUNT`` (default 1), so a
test can run one process per fake device, and its collective backend ``fakegloo`` (gloo
underneath) records each process group made with it.

Memory is simulated and deterministic: a total of 16 GiB, and a fixed 64 MiB per-process
"context" counted as allocated from the first ``setup()`` on (0 before). ``peak`` is the most
ever allocated; ``empty_cache()`` changes neither, as a caching allocator frees only unused
blocks. Tests can therefore assert exact numbers in logged metrics.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from tunesmith import Device
from tunesmith_fake_device.plugin import COUNT_VARIABLE, FAKE_BACKEND, record_call

GiB = 1024**3
MiB = 1024**2
SIMULATED_TOTAL = 16 * GiB
SIMULATED_CONTEXT = 64 * MiB


def _create_process_group(store, rank, world_size, timeout):
    """The fake's collective backend: gloo underneath, recording that a process group was made with it."""
    FakeDevice._record("process_group")
    return torch.distributed.ProcessGroupGloo(store, rank, world_size, timeout)


if FAKE_BACKEND not in torch.distributed.Backend.backend_list:
    torch.distributed.Backend.register_backend(FAKE_BACKEND, _create_process_group, devices=["cpu"])


class FakeDevice(Device):
    type = "cpu"

    #: every call made to any FakeDevice in this process, in order (also appended to the log file)
    calls: list[str] = []

    def __init__(self):
        self._allocated = 0
        self._peak = 0

    @classmethod
    def _record(cls, name: str) -> None:
        cls.calls.append(name)
        record_call(name)

    @staticmethod
    def device_count() -> int:
        FakeDevice._record("device_count")
        return int(os.environ.get(COUNT_VARIABLE, "1"))

    def setup(self, local_rank: int = 0) -> torch.device:
        self._record(f"setup:{local_rank}")
        self._allocated = SIMULATED_CONTEXT
        self._peak = max(self._peak, self._allocated)
        return torch.device("cpu")

    def synchronize(self) -> None:
        self._record("synchronize")

    def memory_stats(self) -> dict[str, int]:
        self._record("memory_stats")
        return {"allocated": self._allocated, "peak": self._peak, "total": SIMULATED_TOTAL}

    def empty_cache(self) -> None:
        self._record("empty_cache")

    def supported_precisions(self) -> tuple[str, ...]:
        self._record("supported_precisions")
        return super().supported_precisions()

    def default_precision(self) -> str:
        self._record("default_precision")
        return "fp32"

    def resolve_precision(self, requested: str, training: bool = False) -> str:
        self._record("resolve_precision")
        return super().resolve_precision(requested, training)

    def grad_scaler(self, precision: str):
        self._record("grad_scaler")
        return super().grad_scaler(precision)

    def autocast(self, precision: str):
        self._record("autocast")
        return super().autocast(precision)

    def seed(self, seed: int) -> None:
        self._record("seed")
        super().seed(seed)

    def get_rng_state(self) -> dict[str, Any]:
        self._record("get_rng_state")
        return super().get_rng_state()

    def set_rng_state(self, state: dict[str, Any]) -> None:
        self._record("set_rng_state")
        super().set_rng_state(state)

    def describe(self) -> str:
        self._record("describe")
        return super().describe() + ", simulated memory"
