"""The fake device passes the device conformance suite. Needs the distribution installed
(``tests/test_fake_device_install.py`` installs it and runs this directory)."""

import pytest

pytest.importorskip("tunesmith_fake_device", reason="tunesmith-fake-device is not installed")

# Loaded here rather than in conftest.py: see there why.
pytest.register_assert_rewrite("tunesmith.testing")
pytest_plugins = ["tunesmith.testing"]

from tunesmith.testing import DeviceConformance  # noqa: E402


class TestFakeDevice(DeviceConformance):
    pass


class TestFakeDeviceUnavailable(DeviceConformance):
    """Installed but unavailable: the suite checks the registration and skips the rest."""

    @pytest.fixture(autouse=True)
    def probe_says_unavailable(self, monkeypatch):
        monkeypatch.setenv("TUNESMITH_FAKE_DEVICE_AVAILABLE", "0")
