"""The entry-point module: registers the ``npu`` device and answers whether it is usable here.

It runs in every ``tunesmith`` process, so it imports nothing heavy at module level: the device
class is named by its dotted path and imported only when the NPU is chosen, and torch_npu (which
imports torch) is imported by the probe only once ``find_spec`` has found it installed.
"""

from __future__ import annotations

import importlib
import os
from importlib.util import find_spec

from tunesmith import DeviceCapabilities, DeviceSpec, Unavailable, hookimpl

#: the Ascend runtime's list of the device ids this process may see (``"0,1"``); unset means all
VISIBLE_DEVICES_VARIABLE = "ASCEND_RT_VISIBLE_DEVICES"

NPU_PRIORITY = 100
NPU_CAPABILITIES = DeviceCapabilities(
    precisions=("fp32", "bf16", "fp16"),
    grad_scaler=True,
    distributed_backend="hccl",
    strategies=None,
    quantization=(),
    memory_stats=True,
)

NOT_INSTALLED = "torch_npu is not installed; pip install 'tunesmith-npu[torch-npu]' with the Ascend toolkit"


def visible_devices_setting() -> str:
    """How ``ASCEND_RT_VISIBLE_DEVICES`` is set, for a message about the devices this process sees."""
    value = os.environ.get(VISIBLE_DEVICES_VARIABLE)
    if value is None:
        return f"{VISIBLE_DEVICES_VARIABLE} is unset, so every device the driver reports is visible"
    return f"{VISIBLE_DEVICES_VARIABLE}={value!r}"


def npu_probe() -> bool | Unavailable:
    """``True`` when torch_npu loads and sees at least one NPU; otherwise what is missing.

    Importing torch_npu loads the Ascend runtime libraries, and counting the devices asks the
    driver, but neither creates a device context: no tensor is made and no device is selected.
    """
    if find_spec("torch_npu") is None:
        return Unavailable(NOT_INSTALLED)
    try:
        torch_npu = importlib.import_module("torch_npu")
    except Exception as error:  # a missing driver or CANN library surfaces as any kind of error
        return Unavailable(
            f"torch_npu is installed but cannot be imported: {error!r}; "
            "are the Ascend driver and CANN toolkit installed, and the toolkit's set_env.sh sourced?"
        )
    try:
        count = torch_npu.npu.device_count()
    except Exception as error:
        return Unavailable(f"torch_npu cannot count the NPUs: {error!r}; is the Ascend driver loaded (npu-smi info)?")
    if count < 1:
        return Unavailable(f"no NPU devices visible ({visible_devices_setting()})")
    return True


@hookimpl
def tunesmith_register_devices():
    return [
        DeviceSpec(
            name="npu",
            device="tunesmith_npu.device:NPUDevice",
            probe=npu_probe,
            priority=NPU_PRIORITY,
            description="Ascend NPU through torch_npu: bf16 where the chip computes it, fp16 with loss scaling, hccl collectives",
            capabilities=NPU_CAPABILITIES,
        )
    ]
