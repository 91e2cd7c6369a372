"""The entry-point module: registers the ``mps`` device, an Apple GPU driven through torch's MPS backend.

It imports nothing heavy. MPS ships inside torch, so there is no lighter package to look for:
the probe first asks the operating system whether this is macOS and imports torch only there,
then asks torch without initialising the GPU. The device class is named by its dotted path and
imported only when ``mps`` is chosen.
"""

from __future__ import annotations

import platform

from tunesmith import DeviceCapabilities, DeviceSpec, Unavailable, hookimpl

#: above the CPU (0), below CUDA and NPU (100): on a Mac, ``--device auto`` picks the GPU
MPS_PRIORITY = 50
#: the first macOS on which torch's MPS backend runs at all
MPS_MINIMUM_MACOS = (12, 3)
#: the first macOS (Sonoma) on which torch's MPS backend computes in bf16
BF16_MINIMUM_MACOS = (14, 0)

#: One process on one GPU: MPS has no collective backend, so no distributed strategy. fp16
#: training is refused ("needs loss scaling") until torch's MPS loss scaler has been checked on
#: a Mac; the README says why. bf16 is declared and offered from macOS 14 on.
MPS_CAPABILITIES = DeviceCapabilities(
    precisions=("fp32", "bf16", "fp16"),
    grad_scaler=False,
    distributed_backend=None,
    strategies=("single",),
    quantization=(),
    memory_stats=True,
)


def macos_version() -> tuple[int, int] | None:
    """This machine's macOS version as ``(major, minor)``, or None when it is not macOS."""
    release = platform.mac_ver()[0]
    if not release:
        return None
    major, _, rest = release.partition(".")
    return int(major), int(rest.partition(".")[0] or 0)


def version_text(version: tuple[int, int]) -> str:
    return ".".join(map(str, version))


def mps_probe() -> bool | Unavailable:
    """Whether torch can compute on this Mac's GPU; answered without initialising it."""
    version = macos_version()
    if version is None:
        return Unavailable(f"MPS needs macOS on Apple silicon; this is {platform.system()}")
    import torch

    if not torch.backends.mps.is_built():
        return Unavailable("this torch build has no MPS support (the torch wheels for macOS from PyPI have it)")
    if not torch.backends.mps.is_available():
        if version < MPS_MINIMUM_MACOS:
            return Unavailable(
                f"torch's MPS backend needs macOS {version_text(MPS_MINIMUM_MACOS)} or later; this Mac runs macOS {version_text(version)}"
            )
        return Unavailable(
            f"torch finds no GPU for MPS on this Mac (macOS {version_text(version)}): MPS needs Apple silicon's GPU, "
            "which virtual machines rarely pass through"
        )
    return True


@hookimpl
def tunesmith_register_devices():
    return [
        DeviceSpec(
            name="mps",
            device="tunesmith_mps.device:MPSDevice",
            probe=mps_probe,
            priority=MPS_PRIORITY,
            description="Apple GPU (Metal Performance Shaders), one process; bf16 from macOS 14",
            capabilities=MPS_CAPABILITIES,
        )
    ]
