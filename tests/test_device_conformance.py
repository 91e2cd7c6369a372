"""The built-in cpu device passes the device conformance suite (``tunesmith.testing``)."""

import pytest

# A third-party plugin declares `pytest_plugins` in its top-level conftest; this repo's conftest
# is shared, so this module loads the plugin itself, registering it for assert rewriting first
# because the import below happens before pytest reads `pytest_plugins`.
pytest.register_assert_rewrite("tunesmith.testing")
pytest_plugins = ["tunesmith.testing"]

from tunesmith.testing import DeviceConformance  # noqa: E402


@pytest.fixture
def tunesmith_device_name():
    return "cpu"


class TestCPUDevice(DeviceConformance):
    pass
