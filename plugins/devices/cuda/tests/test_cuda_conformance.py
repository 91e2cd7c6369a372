"""The cuda device against the device conformance suite, on whatever this machine has.

Without an NVIDIA GPU (or with a torch build lacking CUDA) the probe says unavailable: the checks
of the spec, its capabilities and the probe run, and those needing the hardware are skipped. On a
machine with a GPU every check runs on it.
"""

import pytest

pytest.importorskip("tunesmith_cuda", reason="tunesmith-cuda is not installed")

# Loaded here rather than in conftest.py: see there why.
pytest.register_assert_rewrite("tunesmith.testing")
pytest_plugins = ["tunesmith.testing"]

from tunesmith.testing import DeviceConformance  # noqa: E402


class TestCUDADevice(DeviceConformance):
    pass
