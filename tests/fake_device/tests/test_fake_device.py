"""What the fake device adds to the CPU: simulated memory, a call log, a forced-unavailable probe."""

import pytest

pytest.importorskip("tunesmith_fake_device", reason="tunesmith-fake-device is not installed")

from tunesmith_fake_device.device import SIMULATED_CONTEXT, SIMULATED_TOTAL, FakeDevice  # noqa: E402
from tunesmith_fake_device.plugin import AVAILABLE_VARIABLE, LOG_VARIABLE, fake_is_available  # noqa: E402


def test_memory_is_simulated_and_deterministic():
    device = FakeDevice()
    assert device.memory_stats() == {"allocated": 0, "peak": 0, "total": SIMULATED_TOTAL}
    device.setup(0)
    device.empty_cache()
    assert device.memory_stats() == {"allocated": SIMULATED_CONTEXT, "peak": SIMULATED_CONTEXT, "total": SIMULATED_TOTAL}


def test_calls_are_recorded_in_memory_and_in_the_log_file(tmp_path, monkeypatch):
    log = tmp_path / "calls.log"
    monkeypatch.setenv(LOG_VARIABLE, str(log))
    device = FakeDevice()
    device.setup(1)
    device.seed(3)
    fake_is_available()
    assert FakeDevice.calls == ["setup:1", "seed"]
    assert log.read_text().splitlines() == ["setup:1", "seed", "probe"]


def test_the_probe_can_be_forced_unavailable(monkeypatch, tunesmith_plugin_manager):
    assert tunesmith_plugin_manager.select_device("auto").candidate.name == "fake"
    monkeypatch.setenv(AVAILABLE_VARIABLE, "0")
    assert fake_is_available() is False
    choice = tunesmith_plugin_manager.select_device("auto")
    assert choice.candidate.name == "cpu"
    with pytest.raises(Exception, match="installed but not available"):
        tunesmith_plugin_manager.select_device("fake")
