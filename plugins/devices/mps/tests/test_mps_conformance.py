"""The mps device passes the device conformance suite. Without a Mac's GPU, the probe says it is
unavailable, so the checks of the spec, its capabilities and the probe run and the rest skip."""

import pytest

pytest.importorskip("tunesmith_mps", reason="tunesmith-mps is not installed")

# Loaded here rather than in conftest.py: see there why.
pytest.register_assert_rewrite("tunesmith.testing")
pytest_plugins = ["tunesmith.testing"]

from tunesmith.testing import DeviceConformance  # noqa: E402


class TestMPSDevice(DeviceConformance):
    pass
