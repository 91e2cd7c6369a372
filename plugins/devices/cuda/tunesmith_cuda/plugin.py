"""The entry-point module: the probe and the registration of the ``cuda`` device.

It imports nothing heavy at import time: torch is imported by the probe when it runs, and the
device class is named by its dotted path, imported only when ``cuda`` is chosen.

The probe runs in every ``tunesmith`` process (the one that plans and then starts the training
processes included), so it must not initialise CUDA. It reads the torch build's CUDA version
and counts GPUs with ``torch.cuda.device_count()``, which asks NVML first: NVML reports the
GPUs without touching the CUDA runtime, so no context is created and a later fork stays safe.
Only where NVML cannot answer (no ``libnvidia-ml``, MIG UUIDs in ``CUDA_VISIBLE_DEVICES``)
does torch fall back to ``cudaGetDeviceCount``, which loads the driver but creates no context
either. Both honour ``CUDA_VISIBLE_DEVICES``.
"""

from __future__ import annotations

import os

from tunesmith import DeviceCapabilities, DeviceSpec, OptionSpec, Unavailable, hookimpl

#: the variable naming the GPUs a process may use (indices or UUIDs, comma-separated)
VISIBLE_DEVICES_VARIABLE = "CUDA_VISIBLE_DEVICES"

CUDA_PRIORITY = 100

CUDA_CAPABILITIES = DeviceCapabilities(
    precisions=("fp32", "bf16", "fp16"),
    grad_scaler=True,
    distributed_backend="nccl",
    strategies=None,
    quantization=("qlora",),
    memory_stats=True,
)

CUDA_OPTIONS = (OptionSpec("liger", False, "Use Liger kernels (RMSNorm, SwiGLU, RoPE); needs liger-kernel."),)


def torch_cuda_version() -> str | None:
    """The CUDA version this torch was built against; None for a build without CUDA (CPU, ROCm)."""
    import torch

    return torch.version.cuda


def visible_gpu_count() -> int:
    """GPUs this process may use, as torch counts them (NVML first), without initialising CUDA."""
    import torch

    return torch.cuda.device_count()


def hides_every_gpu(visible_devices: str | None) -> bool:
    """Whether a ``CUDA_VISIBLE_DEVICES`` value lists no GPU at all: empty, or starting with a negative index (``-1``)."""
    if visible_devices is None:
        return False
    first = visible_devices.split(",")[0].strip()
    return not first or first.startswith("-")


def cuda_probe() -> bool | Unavailable:
    """True when this torch can use CUDA and at least one NVIDIA GPU is visible; otherwise why not."""
    if torch_cuda_version() is None:
        return Unavailable("this torch build has no CUDA support; install a CUDA build of torch")
    visible_devices = os.environ.get(VISIBLE_DEVICES_VARIABLE)
    if hides_every_gpu(visible_devices):
        return Unavailable(
            f"{VISIBLE_DEVICES_VARIABLE}={visible_devices!r} hides every GPU; unset it or list the GPUs to use "
            f"({VISIBLE_DEVICES_VARIABLE}=0,1)"
        )
    if visible_gpu_count() == 0:
        limited = f" among {VISIBLE_DEVICES_VARIABLE}={visible_devices!r}" if visible_devices is not None else ""
        return Unavailable(f"no NVIDIA GPU found{limited} (driver missing?)")
    return True


@hookimpl
def tunesmith_register_devices():
    return [
        DeviceSpec(
            name="cuda",
            device="tunesmith_cuda.device:CUDADevice",
            probe=cuda_probe,
            priority=CUDA_PRIORITY,
            description="NVIDIA GPUs: bf16 from compute capability 8.0, NCCL, QLoRA (bitsandbytes), Liger kernels, flash attention",
            capabilities=CUDA_CAPABILITIES,
            options=CUDA_OPTIONS,
        )
    ]
