"""``CUDADevice``: NVIDIA GPUs through ``torch.cuda``.

Each process drives one GPU, the one of its local rank (``setup``); the processes of a job talk
over NCCL. What the model gets on this hardware:

- **Precision.** bf16 is computed natively from compute capability 8.0 (Ampere) on; older GPUs
  (Volta, Turing) train in fp16 with the loss scaler. The lowest capability among the visible
  GPUs decides, so every process of a machine makes the same choice. It is asked of NVML, as
  the GPU count is: the precision is resolved before ``setup`` (in the process that plans the
  run and starts the others, too), where torch's own query would run its lazy CUDA
  initialisation, which can leave a context on the first GPU. Where NVML cannot answer (no
  driver library, MIG instances in ``CUDA_VISIBLE_DEVICES``), torch answers.
- **Attention.** flash-attention 2 where the ``flash_attn`` package is installed, every visible
  GPU is Ampere or newer and the run computes in bf16 or fp16 (flash attention has no fp32);
  PyTorch's SDPA otherwise.
- **QLoRA.** 4-bit NF4 weights with double quantisation through bitsandbytes, computing in
  bf16 (fp16 before Ampere).
- **Liger kernels** (``--liger``): Liger's RMSNorm, SwiGLU/GeGLU and RoPE patched into the
  loaded model, and its fused linear cross-entropy as the device's
  ``fused_linear_cross_entropy``, which the ``sft`` and ``pt`` losses call with the target
  positions' hidden states and the head's weight. (Patched into the model instead, it would
  replace the model's own loss, which tunesmith's trainers never ask for.)

The optional packages (``bitsandbytes``, ``liger_kernel``, ``flash_attn``) are looked up with
``find_spec`` and imported only when used.
"""

from __future__ import annotations

import ctypes
from importlib.util import find_spec
from typing import Any

import torch

from tunesmith import ConfigError, Device

#: the oldest architecture (Ampere) computing bf16 natively and running flash-attention 2
AMPERE = (8, 0)

#: the NVIDIA management library, which the driver installs
NVML_LIBRARY = "libnvidia-ml.so.1"
NVML_SUCCESS = 0

QLORA_INSTALL = "pip install 'tunesmith-cuda[qlora]'"
LIGER_INSTALL = "pip install 'tunesmith-cuda[liger]'"


def nvml_compute_capabilities(count: int) -> list[tuple[int, int]] | None:
    """The compute capability of each of the first ``count`` visible GPUs, asked of NVML, which creates no CUDA context.

    None where NVML cannot answer: no driver library, a visible GPU NVML cannot name (MIG
    instances), an error. Visible indices are mapped to NVML's as torch maps them.
    """
    try:
        nvml = ctypes.CDLL(NVML_LIBRARY)
    except OSError:
        return None
    if nvml.nvmlInit_v2() != NVML_SUCCESS:
        return None
    try:
        capabilities = []
        for index in range(count):
            handle, major, minor = ctypes.c_void_p(), ctypes.c_int(), ctypes.c_int()
            if nvml.nvmlDeviceGetHandleByIndex_v2(torch.cuda._get_nvml_device_index(index), ctypes.byref(handle)) != NVML_SUCCESS:
                return None
            if nvml.nvmlDeviceGetCudaComputeCapability(handle, ctypes.byref(major), ctypes.byref(minor)) != NVML_SUCCESS:
                return None
            capabilities.append((major.value, minor.value))
        return capabilities
    except RuntimeError:  # torch could not map a visible GPU to NVML's index
        return None
    finally:
        nvml.nvmlShutdown()


class CUDADevice(Device):
    type = "cuda"

    def __init__(self):
        #: the GPU this process drives: its local rank once ``setup`` ran, the first visible one before
        self.index = 0
        #: what ``resolve_precision`` chose for this run; the attention implementation depends on it
        self.resolved_precision: str | None = None

    @staticmethod
    def device_count() -> int:
        """GPUs visible to this process (``CUDA_VISIBLE_DEVICES`` applied), counted through NVML where it answers."""
        return torch.cuda.device_count()

    def setup(self, local_rank: int = 0) -> torch.device:
        torch.cuda.set_device(local_rank)
        self.index = local_rank
        return torch.device("cuda", local_rank)

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.index)

    def memory_stats(self) -> dict[str, int]:
        return {
            "allocated": torch.cuda.memory_allocated(self.index),
            "peak": torch.cuda.max_memory_allocated(self.index),
            "total": torch.cuda.get_device_properties(self.index).total_memory,
        }

    def empty_cache(self) -> None:
        torch.cuda.empty_cache()

    # -- precision -----------------------------------------------------------------------------
    def lowest_compute_capability(self) -> tuple[int, int]:
        """The oldest architecture among the visible GPUs, as ``(major, minor)``: what every process here can rely on.

        Asked of NVML, so that no CUDA context is made before ``setup``; of torch where NVML cannot answer.
        """
        count = self.device_count()
        capabilities = nvml_compute_capabilities(count)
        if capabilities is None:
            capabilities = [torch.cuda.get_device_capability(index) for index in range(count)]
        return min(capabilities)

    def supported_precisions(self) -> tuple[str, ...]:
        """The declared precisions, without bf16 where a visible GPU predates Ampere (compute capability 8.0)."""
        if self.lowest_compute_capability() >= AMPERE:
            return self.capabilities.precisions
        return tuple(precision for precision in self.capabilities.precisions if precision != "bf16")

    def default_precision(self) -> str:
        """bf16 where the GPUs compute it natively (Ampere and newer), else fp16, trained with the loss scaler."""
        return "bf16" if "bf16" in self.supported_precisions() else "fp16"

    def resolve_precision(self, requested: str, training: bool = False) -> str:
        """The base class's answer, remembered: flash attention is chosen only for a run in bf16 or fp16."""
        self.resolved_precision = super().resolve_precision(requested, training)
        return self.resolved_precision

    # -- randomness ----------------------------------------------------------------------------
    def seed(self, seed: int) -> None:
        super().seed(seed)
        torch.cuda.manual_seed_all(seed)

    def get_rng_state(self) -> dict[str, Any]:
        """The CPU generators and the generator of this process's GPU, the only one it draws from.

        Only its own GPU's: a checkpoint may be resumed on a machine with fewer GPUs, or on more
        processes, whose new ranks start from rank 0's states.
        """
        return {**super().get_rng_state(), "cuda": torch.cuda.get_rng_state(self.index)}

    def set_rng_state(self, state: dict[str, Any]) -> None:
        """Restore what ``get_rng_state`` saved; a checkpoint written on another device leaves the GPU's generator as seeded."""
        super().set_rng_state(state)
        if "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"], self.index)

    def describe(self) -> str:
        major, minor = torch.cuda.get_device_capability(self.index)
        return (
            f"{self.name} ({torch.cuda.get_device_name(self.index)}, compute capability {major}.{minor}, "
            f"{self.device_count()} device(s), backend {self.distributed_backend})"
        )

    # -- the model on this hardware ------------------------------------------------------------
    def check_options(self) -> None:
        if self.options["liger"] and find_spec("liger_kernel") is None:
            raise ConfigError(f"--liger: the Liger kernels need liger-kernel, which is not installed; install it with: {LIGER_INSTALL}")

    def attention_implementation(self) -> str:
        flash = (
            find_spec("flash_attn") is not None
            and self.resolved_precision in ("bf16", "fp16")
            and self.lowest_compute_capability() >= AMPERE
        )
        return "flash_attention_2" if flash else "sdpa"

    def quantization_config(self, adapter: str) -> Any:
        """4-bit NF4 weights with double quantisation (bitsandbytes), computing in bf16, or fp16 before Ampere."""
        if find_spec("bitsandbytes") is None:
            raise ConfigError(
                f"--adapter {adapter}: quantising the weights on CUDA needs bitsandbytes, which is not installed; "
                f"install it with: {QLORA_INSTALL}"
            )
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if "bf16" in self.supported_precisions() else torch.float16,
        )

    def fused_linear_cross_entropy(self):
        """With ``--liger``, Liger's fused linear cross-entropy, summed over the rows."""
        if not self.options["liger"]:
            return None
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        loss = LigerFusedLinearCrossEntropyLoss(reduction="sum")

        def summed_cross_entropy(hidden, weight, targets, bias):
            result = loss(weight, hidden, targets, bias)
            return result[0] if isinstance(result, tuple) else result  # releases that also return a z-loss

        return summed_cross_entropy

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """With ``--liger``, patch Liger's kernels into this model instance (all but its fused loss, see the module docstring)."""
        if not self.options["liger"]:
            return model
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

        model_type = model.config.model_type
        if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
            raise ConfigError(f"--liger: the installed liger-kernel has no kernels for model type {model_type!r}; leave --liger off for this model")
        _apply_liger_kernel_to_instance(model=model, fused_linear_cross_entropy=False)
        return model
