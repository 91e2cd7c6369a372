"""The entry-point module: registers the ``fake`` device. Imports nothing heavy; the device class
is named by its dotted path and imported only when the fake is chosen."""

from __future__ import annotations

import os

from tunesmith import DeviceCapabilities, DeviceSpec, hookimpl

#: ``0`` makes the probe answer "unavailable", to exercise an installed but unusable device.
AVAILABLE_VARIABLE = "TUNESMITH_FAKE_DEVICE_AVAILABLE"
#: a file to which every recorded call is appended, one name per line (see ``record_call``).
LOG_VARIABLE = "TUNESMITH_FAKE_DEVICE_LOG"
#: how many fake devices this machine pretends to have.
COUNT_VARIABLE = "TUNESMITH_FAKE_DEVICE_COUNT"

FAKE_PRIORITY = 10
#: the fake's collective backend: gloo underneath, registered under this name by the device module
FAKE_BACKEND = "fakegloo"


def record_call(name: str) -> None:
    """Append ``name`` to the log file, so that a test can see what a subprocess called."""
    log = os.environ.get(LOG_VARIABLE)
    if log:
        with open(log, "a", encoding="utf-8") as file:
            file.write(name + "\n")


def fake_is_available() -> bool:
    record_call("probe")
    return os.environ.get(AVAILABLE_VARIABLE, "1") != "0"


@hookimpl
def tunesmith_register_devices():
    return [
        DeviceSpec(
            name="fake",
            device="tunesmith_fake_device.device:FakeDevice",
            probe=fake_is_available,
            priority=FAKE_PRIORITY,
            description="fake accelerator for tests (CPU underneath, simulated memory)",
            capabilities=DeviceCapabilities(precisions=("fp32", "bf16"), distributed_backend=FAKE_BACKEND, memory_stats=True),
        )
    ]
