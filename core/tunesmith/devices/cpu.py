"""The built-in CPU device."""

from __future__ import annotations

import functools
import os
import resource
import sys

import torch

from tunesmith.device import Device

CPUINFO_PATH = "/proc/cpuinfo"
NATIVE_BF16_FLAGS = {"amx_bf16", "avx512_bf16"}


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 matmuls in hardware (AMX or AVX512-BF16)."""
    try:
        with open(CPUINFO_PATH, encoding="utf-8") as cpuinfo:
            flags = set(cpuinfo.read().split())
    except OSError:
        return False
    return bool(NATIVE_BF16_FLAGS & flags)


class CPUDevice(Device):
    type = "cpu"

    @staticmethod
    def device_count() -> int:
        return 1

    def setup(self, local_rank: int = 0) -> torch.device:
        return torch.device("cpu")

    def memory_stats(self) -> dict[str, int]:
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak = peak_kib if sys.platform == "darwin" else peak_kib * 1024
        allocated = peak
        try:
            with open("/proc/self/statm", encoding="ascii") as statm:
                allocated = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            pass
        # ru_maxrss lags the live resident size by a few pages; peak can never be below it.
        return {"allocated": allocated, "peak": max(peak, allocated)}

    def default_precision(self) -> str:
        return "bf16" if cpu_has_native_bf16() and "bf16" in self.supported_precisions() else "fp32"

    def precision_advice(self, precision: str, training: bool) -> str | None:
        if precision != "fp16":
            return None
        native = "bf16 is native on this CPU (--precision bf16)" if self.default_precision() == "bf16" else "fp32 is as fast here"
        scaling = ", and its loss scaling skips the first steps while it finds a scale" if training else ""
        return f"note: fp16 is emulated on CPUs, slower than fp32{scaling}; {native}"
