"""The probe: every reason the NPU cannot be used is named so that a user can act on it, and
finding it usable initialises nothing. torch_npu is absent, broken or a stand-in (conftest.py)."""

import subprocess
import sys

import pytest

from tunesmith import Unavailable
from tunesmith.errors import PluginError
from tunesmith_npu.plugin import NOT_INSTALLED, npu_probe


def test_without_torch_npu_the_probe_says_what_to_install(torch_npu_missing):
    answer = npu_probe()
    assert answer == Unavailable("torch_npu is not installed; pip install 'tunesmith-npu[torch-npu]' with the Ascend toolkit")


def test_a_torch_npu_that_cannot_be_imported_is_named(broken_torch_npu):
    answer = npu_probe()
    assert isinstance(answer, Unavailable)
    assert answer.reason.startswith("torch_npu is installed but cannot be imported: ImportError('libascendcl.so: cannot open")
    assert "CANN toolkit" in answer.reason


def test_a_driver_that_cannot_count_the_devices_is_named(fake_npu, monkeypatch):
    def driver_missing():
        raise RuntimeError("drvGetDevNum failed")

    monkeypatch.setattr(fake_npu, "device_count", driver_missing)
    answer = npu_probe()
    assert isinstance(answer, Unavailable)
    assert answer.reason == (
        "torch_npu cannot count the NPUs: RuntimeError('drvGetDevNum failed'); is the Ascend driver loaded (npu-smi info)?"
    )


def test_no_visible_device_names_the_visible_devices_setting(fake_npu, monkeypatch):
    fake_npu.count = 0
    monkeypatch.setenv("ASCEND_RT_VISIBLE_DEVICES", "")
    assert npu_probe() == Unavailable("no NPU devices visible (ASCEND_RT_VISIBLE_DEVICES='')")
    monkeypatch.delenv("ASCEND_RT_VISIBLE_DEVICES")
    assert npu_probe() == Unavailable(
        "no NPU devices visible (ASCEND_RT_VISIBLE_DEVICES is unset, so every device the driver reports is visible)"
    )


def test_visible_devices_make_it_available_without_initialising_any(fake_npu):
    assert npu_probe() is True
    assert fake_npu.calls == ["device_count"], "the probe may count the devices, never select one or allocate on it"


def test_the_plugin_manager_reports_why_the_npu_is_unavailable(torch_npu_missing, tunesmith_plugin_manager):
    (npu,) = [candidate for candidate in tunesmith_plugin_manager.device_candidates() if candidate.name == "npu"]
    assert npu.registered.distribution == "tunesmith-npu" and npu.priority == 100
    assert not npu.available and npu.reason == NOT_INSTALLED
    assert tunesmith_plugin_manager.select_device("auto").candidate.name == "cpu"
    with pytest.raises(PluginError, match="--device npu: the device is installed but not available here"):
        tunesmith_plugin_manager.select_device("npu")


#: what the entry-point module, loaded by every tunesmith command, must not import
HEAVY_MODULES = ("torch", "torch_npu")


def test_the_entry_point_module_imports_nothing_heavy():
    imported = subprocess.run(
        [sys.executable, "-c", f"import sys, tunesmith_npu.plugin; print([m for m in {HEAVY_MODULES} if m in sys.modules])"],
        capture_output=True, text=True, check=True,
    )
    assert imported.stdout.strip() == "[]"
