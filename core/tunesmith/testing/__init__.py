"""Test suites plugins run against themselves, and the fault helpers they use.

``pytest_plugins = ["tunesmith.testing"]`` in a plugin's ``conftest.py`` brings the fixtures of
both suites:

- :class:`DeviceConformance` (:mod:`tunesmith.testing.device_conformance`): a device plugin
  honours the interface the training loop relies on.
- :class:`CheckpointFaults` (:mod:`tunesmith.testing.checkpoint_faults`): a trainer, strategy or
  optimizer survives damaged checkpoints, a kill during a save and a disk that refuses a write.

:mod:`tunesmith.testing.faults` holds the fault helpers themselves (damaging a file, a command
run with a fault armed, a size-limited file system).
"""

from tunesmith.testing.checkpoint_faults import CheckpointFaults, tunesmith_fault_command, tunesmith_fault_launcher
from tunesmith.testing.device_conformance import (
    DeviceConformance,
    tunesmith_device,
    tunesmith_device_available,
    tunesmith_device_name,
    tunesmith_device_registration,
    tunesmith_plugin_manager,
    tunesmith_torch_device,
)

__all__ = [
    "CheckpointFaults",
    "DeviceConformance",
    "tunesmith_device",
    "tunesmith_device_available",
    "tunesmith_device_name",
    "tunesmith_device_registration",
    "tunesmith_fault_command",
    "tunesmith_fault_launcher",
    "tunesmith_plugin_manager",
    "tunesmith_torch_device",
]
