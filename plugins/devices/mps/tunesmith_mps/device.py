"""``MPSDevice``: the GPU of a Mac, driven through torch's Metal Performance Shaders (MPS) backend.

- **One process, one GPU.** A Mac has one GPU, which torch calls ``mps``; MPS has no
  collective backend, so the plugin declares only the ``single`` strategy.
- **Precisions follow the macOS version.** torch computes bf16 on MPS from macOS 14 (Sonoma)
  on, so :meth:`MPSDevice.supported_precisions` drops bf16 on older systems and ``auto``
  resolves to bf16 where it is offered, fp32 elsewhere.
- **Peak memory is the most seen.** MPS counts the bytes tensors hold now but keeps no peak, so
  ``peak`` is the largest allocation any :meth:`MPSDevice.memory_stats` call has seen in this
  process: a lower bound of the true peak, which may fall between two calls.
- **Missing operators.** An operator torch has not implemented for MPS raises
  ``NotImplementedError``; :func:`explain_missing_operator` turns it into a message naming the
  operator and ``PYTORCH_ENABLE_MPS_FALLBACK=1``.
"""

from __future__ import annotations

import platform
import re
from typing import Any

import torch

from tunesmith import Device
from tunesmith_mps.plugin import BF16_MINIMUM_MACOS, macos_version

#: set to 1 before torch starts, it makes torch run operators MPS lacks on the CPU instead of failing
FALLBACK_VARIABLE = "PYTORCH_ENABLE_MPS_FALLBACK"
#: how torch's MPS backend names an operator it has no kernel for
MISSING_OPERATOR = re.compile(r"operator '(?P<operator>[^']+)' is not currently implemented for the MPS device")


class MPSDevice(Device):
    """A Mac's one GPU, torch's ``mps`` device, driven by one process."""

    type = "mps"

    def __init__(self):
        self._peak_allocated = 0

    @staticmethod
    def device_count() -> int:
        return 1

    def setup(self, local_rank: int = 0) -> torch.device:
        return torch.device("mps")

    def synchronize(self) -> None:
        torch.mps.synchronize()

    def memory_stats(self) -> dict[str, int]:
        """Bytes held by tensors now, the most seen so far, and all the Metal driver holds for this process (caches included)."""
        allocated = torch.mps.current_allocated_memory()
        self._peak_allocated = max(self._peak_allocated, allocated)
        return {"allocated": allocated, "peak": self._peak_allocated, "driver_allocated": torch.mps.driver_allocated_memory()}

    def empty_cache(self) -> None:
        torch.mps.empty_cache()

    def supported_precisions(self) -> tuple[str, ...]:
        """The declared precisions, without bf16 before macOS 14."""
        version = macos_version()
        bf16 = version is not None and version >= BF16_MINIMUM_MACOS
        return tuple(precision for precision in self.capabilities.precisions if precision != "bf16" or bf16)

    def default_precision(self) -> str:
        return "bf16" if "bf16" in self.supported_precisions() else "fp32"

    def seed(self, seed: int) -> None:
        """Seed Python, the CPU and the MPS generator (named here rather than left to ``torch.manual_seed``'s fan-out)."""
        super().seed(seed)
        torch.mps.manual_seed(seed)

    def get_rng_state(self) -> dict[str, Any]:
        return {**super().get_rng_state(), "mps": torch.mps.get_rng_state()}

    def set_rng_state(self, state: dict[str, Any]) -> None:
        """Restore the states; a checkpoint written on another device has no MPS state, and the MPS generator keeps its seed."""
        super().set_rng_state(state)
        if "mps" in state:
            torch.mps.set_rng_state(state["mps"])

    def explain_error(self, error: Exception) -> str | None:
        return explain_missing_operator(error)

    def describe(self) -> str:
        return f"{super().describe()}, {torch.backends.mps.get_name()} on macOS {platform.mac_ver()[0]}"


def explain_missing_operator(error: BaseException) -> str | None:
    """What to do about an operator torch's MPS backend has not implemented; None for any other error.

    torch raises ``NotImplementedError`` naming the operator. With ``PYTORCH_ENABLE_MPS_FALLBACK=1``
    in the environment when torch starts, it runs such operators on the CPU instead, copying
    their tensors there and back, which is slower but lets the run go on.
    """
    if not isinstance(error, NotImplementedError):
        return None
    missing = MISSING_OPERATOR.search(str(error))
    if missing is None:
        return None
    return (
        f"the operator {missing['operator']} is not implemented for the MPS device in torch {torch.__version__}; "
        f"start tunesmith with {FALLBACK_VARIABLE}=1 in the environment (e.g. `{FALLBACK_VARIABLE}=1 tunesmith sft ...`) "
        "to run that operator on the CPU instead: slower, as its tensors are copied to the CPU and back each time"
    )
