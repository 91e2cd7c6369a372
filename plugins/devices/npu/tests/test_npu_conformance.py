"""The npu device passes the device conformance suite.

Without Ascend hardware (torch_npu not installed, as in CI) the probe says unavailable, so the
checks of the registration, the capabilities and the probe run and the hardware checks are
skipped; on a machine with NPUs and torch_npu every check runs on the real device.
"""

import pytest

pytest.importorskip("tunesmith_npu", reason="tunesmith-npu is not installed")

# Loaded here rather than in conftest.py: see there why.
pytest.register_assert_rewrite("tunesmith.testing")
pytest_plugins = ["tunesmith.testing"]

from tunesmith.testing import DeviceConformance  # noqa: E402


class TestNPUDevice(DeviceConformance):
    pass
