"""``NPUDevice``: Ascend NPUs through torch_npu, the only module of this plugin importing it.

torch_npu adds the ``npu`` device type to torch and the ``torch.npu`` namespace (device count,
selection, memory, random generators), shaped like ``torch.cuda``. It is imported here
explicitly, so the device works whether or not torch's own backend autoload
(``TORCH_DEVICE_BACKEND_AUTOLOAD``) has already imported it with torch.

The Ascend runtime honours ``ASCEND_RT_VISIBLE_DEVICES``: ``device_count()`` and the local ranks
given to ``setup`` count only the devices it lists, renumbered from 0.
"""

from __future__ import annotations

from typing import Any

import torch
import torch_npu  # noqa: F401  (registers the "npu" device type and torch.npu)

from tunesmith import Device


class NPUDevice(Device):
    """One NPU per process. The loss scaler and autocast are the base class's on device type ``npu``
    (``torch.amp.GradScaler("npu")``, ``torch.autocast("npu")``), both of which torch_npu implements."""

    type = "npu"

    @staticmethod
    def device_count() -> int:
        return torch.npu.device_count()

    def setup(self, local_rank: int = 0) -> torch.device:
        torch.npu.set_device(local_rank)
        return torch.device(self.type, local_rank)

    def synchronize(self) -> None:
        torch.npu.synchronize()

    def memory_stats(self) -> dict[str, int]:
        return {"allocated": int(torch.npu.memory_allocated()), "peak": int(torch.npu.max_memory_allocated())}

    def empty_cache(self) -> None:
        torch.npu.empty_cache()

    def supported_precisions(self) -> tuple[str, ...]:
        """The declared precisions, without bf16 on a chip that does not compute it (Ascend 910A, 310P)."""
        declared = super().supported_precisions()
        if computes_bf16():
            return declared
        return tuple(precision for precision in declared if precision != "bf16")

    def default_precision(self) -> str:
        """bf16, which Ascend 910B and later compute natively; fp32 on a chip without it."""
        return "bf16" if "bf16" in self.supported_precisions() else "fp32"

    def seed(self, seed: int) -> None:
        super().seed(seed)
        torch.npu.manual_seed_all(seed)

    def get_rng_state(self) -> dict[str, Any]:
        """The CPU and Python states, and the generator of this process's NPU."""
        return {**super().get_rng_state(), "npu": torch.npu.get_rng_state()}

    def set_rng_state(self, state: dict[str, Any]) -> None:
        """Restore what ``get_rng_state`` saved; a checkpoint written on another device has no NPU state to restore."""
        super().set_rng_state(state)
        if "npu" in state:
            torch.npu.set_rng_state(state["npu"])

    def describe(self) -> str:
        """The generic line, followed by the chip's name (``Ascend910B3``) where torch_npu reports it."""
        description = super().describe()
        get_device_name = getattr(torch.npu, "get_device_name", None)
        return description if get_device_name is None else f"{description}, {get_device_name()}"


def computes_bf16() -> bool:
    """Whether this NPU computes bf16, by torch_npu's own query; assumed (Ascend 910B and later) where it has none."""
    is_bf16_supported = getattr(torch.npu, "is_bf16_supported", None)
    return True if is_bf16_supported is None else bool(is_bf16_supported())
