"""The built-in cpu device: --precision auto is bf16 exactly where the CPU computes bf16 natively."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import cpu_device
from tunesmith.devices import cpu
from tunesmith.errors import ConfigError


@pytest.fixture
def cpuinfo(tmp_path, monkeypatch):
    def write(flags: str):
        path = tmp_path / "cpuinfo"
        path.write_text(f"processor\t: 0\nflags\t\t: fpu sse2 avx2 {flags}\n")
        monkeypatch.setattr(cpu, "CPUINFO_PATH", str(path))
        cpu.cpu_has_native_bf16.cache_clear()

    yield write
    cpu.cpu_has_native_bf16.cache_clear()


@pytest.mark.parametrize(("flags", "expected"), [("avx512_bf16", "bf16"), ("amx_bf16 amx_tile", "bf16"), ("avx512f", "fp32"), ("", "fp32")])
def test_auto_precision_follows_the_cpu_flags(cpuinfo, flags, expected):
    cpuinfo(flags)
    device = cpu_device()
    assert device.resolve_precision("auto") == expected
    assert device.resolve_precision("fp32") == "fp32"


def test_no_cpuinfo_means_fp32(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu, "CPUINFO_PATH", str(tmp_path / "missing"))
    cpu.cpu_has_native_bf16.cache_clear()
    try:
        assert cpu_device().default_precision() == "fp32"
    finally:
        cpu.cpu_has_native_bf16.cache_clear()


def test_unsupported_precision_names_the_option():
    device = cpu_device()
    with pytest.raises(ConfigError, match="--precision fp8"):
        device.resolve_precision("fp8")



STEPS_OF_ACTIVATIONS = """
import os, random, sys, torch
from tunesmith.devices.malloc import return_large_blocks_to_the_system
if sys.argv[1] == "fixed":
    assert return_large_blocks_to_the_system()
def resident():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
rng, kept = random.Random(0), []
start = resident()
for step in range(6):  # each step: activations of varying sizes, freed; something small kept
    activations = [torch.ones(rng.randint(1 << 20, 24 << 20), dtype=torch.uint8) for _ in range(30)]
    kept.append(torch.ones(rng.randint(1 << 20, 4 << 20), dtype=torch.uint8))
    del activations
print(resident() - start - sum(t.numel() for t in kept))
"""


@pytest.mark.skipif(not Path("/proc/self/statm").is_file(), reason="reads the resident size from /proc")
def test_a_fixed_mmap_threshold_returns_freed_activations_to_the_system():
    def left_resident(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", STEPS_OF_ACTIVATIONS, mode], capture_output=True, text=True, check=True).stdout
        return int(out.split()[-1])

    if left_resident("dynamic") < 64 << 20:
        pytest.skip("this C library returns freed blocks by itself")
    assert left_resident("fixed") < 64 << 20
