"""The cuda plugin's own code, run on a machine without an NVIDIA GPU.

The absent hardware is faked at the narrowest seam, so that the plugin's real code runs, and
torch's own where it can:

- NVML, the driver's management library: ``ctypes.CDLL("libnvidia-ml.so.1")`` loads a fake
  answering the handful of functions torch and the plugin call (count, handles, UUIDs, compute
  capability), so torch's own NVML device count, with its parsing of ``CUDA_VISIBLE_DEVICES``,
  and the plugin's NVML capability query run as they would on a GPU machine;
- ``torch.version.cuda``, and ``torch.cuda.device_count``, whose CPU build answers 0 before it
  asks NVML: here it does what it does on a CUDA build before CUDA starts (NVML's count, the
  CUDA runtime's where NVML cannot answer);
- the few ``torch.cuda`` functions the device calls that need a driver (capability, name,
  properties, ``set_device``, memory, generators).

Optional packages are "installed" or not by the answer ``find_spec`` gives the device module.
Nothing replaces a whole module with a mock.
"""

from __future__ import annotations

import ctypes
import importlib.util
import subprocess
import sys
from importlib.machinery import ModuleSpec
from types import ModuleType, SimpleNamespace

import pytest
import torch

pytest.importorskip("tunesmith_cuda", reason="tunesmith-cuda is not installed")

import tunesmith_cuda.device as cuda_device  # noqa: E402
from tunesmith.config import TrainConfig, collect_plugin_options  # noqa: E402
from tunesmith.errors import ConfigError  # noqa: E402
from tunesmith.plugins import build_device  # noqa: E402
from tunesmith.records import Unavailable  # noqa: E402
from tunesmith.runtime import plan_training, select_runtime  # noqa: E402
from tunesmith_cuda.plugin import VISIBLE_DEVICES_VARIABLE, cuda_probe  # noqa: E402

GiB = 1024**3
A100 = SimpleNamespace(name="NVIDIA A100-SXM4-80GB", capability=(8, 0), total_memory=80 * GiB)
T4 = SimpleNamespace(name="Tesla T4", capability=(7, 5), total_memory=16 * GiB)

NVML_SUCCESS, NVML_ERROR_INVALID_ARGUMENT = 0, 2


def gpu_uuid(nvml_index: int) -> str:
    return f"GPU-{nvml_index}e1f2a3b-fake"


class FakeNVML:
    """``libnvidia-ml`` describing ``gpus`` (NVML index = position), called as torch and the plugin call it through ctypes."""

    def __init__(self, gpus: list):
        self.gpus = gpus
        #: sessions opened with ``nvmlInit_v2`` (the plugin's) and not yet shut down
        self.open_sessions = 0

    def nvmlInit(self) -> int:  # torch's, which never shuts its sessions down
        return NVML_SUCCESS

    def nvmlInit_v2(self) -> int:
        self.open_sessions += 1
        return NVML_SUCCESS

    def nvmlShutdown(self) -> int:
        self.open_sessions -= 1
        return NVML_SUCCESS

    def nvmlDeviceGetCount_v2(self, count) -> int:
        count._obj.value = len(self.gpus)
        return NVML_SUCCESS

    def nvmlDeviceGetHandleByIndex_v2(self, index: int, handle) -> int:
        if not 0 <= index < len(self.gpus):
            return NVML_ERROR_INVALID_ARGUMENT
        handle._obj.value = index + 1  # a handle is an opaque pointer, never NULL
        return NVML_SUCCESS

    def nvmlDeviceGetUUID(self, handle, buffer, length) -> int:
        buffer.value = gpu_uuid(handle.value - 1).encode()
        return NVML_SUCCESS

    def nvmlDeviceGetCudaComputeCapability(self, handle, major, minor) -> int:
        major._obj.value, minor._obj.value = self.gpus[handle.value - 1].capability
        return NVML_SUCCESS


class FakeMachine:
    """NVIDIA GPUs as torch sees them, below the functions the plugin calls.

    ``calls`` records what reached the fake driver: ``cudaGetDeviceCount`` (torch's fallback
    when NVML cannot answer), ``set_device:N``, ``synchronize:N``, ``empty_cache``, ``seed:S``.
    ``started`` names each faked function that in torch starts CUDA first (its lazy
    initialisation), as nothing may before ``setup``. Reaching torch's own initialisation
    (``torch.cuda.init`` / ``_lazy_init``, through any function left real) fails the test.
    """

    def __init__(self, monkeypatch, gpus: list, nvml_installed: bool = True):
        self.gpus = gpus
        self.nvml = FakeNVML(gpus)
        self.calls: list[str] = []
        self.started: list[str] = []
        self.generators = {index: torch.tensor([index], dtype=torch.uint8) for index in range(len(gpus))}
        real_cdll = ctypes.CDLL

        def load_library(name, *arguments, **keywords):
            if name != cuda_device.NVML_LIBRARY:
                return real_cdll(name, *arguments, **keywords)
            if not nvml_installed:
                raise OSError(f"{name}: cannot open shared object file: No such file or directory")
            return self.nvml

        monkeypatch.setattr(ctypes, "CDLL", load_library)
        monkeypatch.setattr(torch.version, "cuda", "12.8")
        monkeypatch.setattr(torch.cuda, "device_count", self._device_count)
        monkeypatch.setattr(torch.cuda, "_lazy_init", self._cuda_started)
        monkeypatch.setattr(torch.cuda, "init", self._cuda_started)
        starting = {
            "get_device_capability": lambda index: self.gpus[index].capability,
            "get_device_name": lambda index: self.gpus[index].name,
            "get_device_properties": lambda index: self.gpus[index],
            "set_device": lambda index: self.calls.append(f"set_device:{index}"),
            "synchronize": lambda index: self.calls.append(f"synchronize:{index}"),
            "memory_allocated": lambda index: GiB * (index + 1),
            "max_memory_allocated": lambda index: 2 * GiB * (index + 1),
            "get_rng_state": lambda index: self.generators[index].clone(),
        }
        for name, answer in starting.items():
            monkeypatch.setattr(torch.cuda, name, self._starting_cuda(name, answer))
        # These three do not start CUDA in torch: seeding and setting a state wait for it, emptying needs none.
        monkeypatch.setattr(torch.cuda, "empty_cache", lambda: self.calls.append("empty_cache"))
        monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: self.calls.append(f"seed:{seed}"))
        monkeypatch.setattr(torch.cuda, "set_rng_state", self._set_generator)

    def _device_count(self) -> int:
        """``torch.cuda.device_count()`` of a CUDA build in a process where CUDA has not started."""
        counted_by_nvml = torch.cuda._device_count_nvml()
        if counted_by_nvml >= 0:
            return counted_by_nvml
        self.calls.append("cudaGetDeviceCount")
        return len(self.gpus)

    def _starting_cuda(self, name, answer):
        def function(*arguments):
            self.started.append(name)
            return answer(*arguments)

        return function

    def _set_generator(self, state, index):
        self.generators[index] = state.clone()

    @staticmethod
    def _cuda_started():
        pytest.fail("torch's CUDA state was started (torch.cuda.init / _lazy_init)")


@pytest.fixture
def machine(monkeypatch):
    """``machine(A100, A100)``: this process sees those GPUs (``CUDA_VISIBLE_DEVICES`` unset)."""
    monkeypatch.delenv(VISIBLE_DEVICES_VARIABLE, raising=False)

    def build(*gpus, nvml_installed: bool = True) -> FakeMachine:
        return FakeMachine(monkeypatch, list(gpus), nvml_installed)

    return build


@pytest.fixture
def packages(monkeypatch):
    """``packages(bitsandbytes=True, flash_attn=False)``: what the device module's ``find_spec`` finds."""
    answers: dict[str, bool] = {"bitsandbytes": False, "liger_kernel": False, "flash_attn": False}
    real_find_spec = importlib.util.find_spec

    def find_spec(name, package=None):
        if name in answers:
            return ModuleSpec(name, None) if answers[name] else None
        return real_find_spec(name, package)

    monkeypatch.setattr(cuda_device, "find_spec", find_spec)
    return answers.update


@pytest.fixture
def cuda(tunesmith_plugin_manager):
    """A CUDADevice as the registry builds it (name, capabilities, default options)."""

    def build(**options):
        return build_device(tunesmith_plugin_manager.get("device", "cuda"), options)

    return build


def train_config(tmp_path, **options) -> TrainConfig:
    data = tmp_path / "train.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n')
    return TrainConfig(model=str(tmp_path / "no-such-model"), dataset=(str(data),), output_dir=str(tmp_path / "run"), **options)


def config_only_model(tmp_path):
    """A model folder with only config.json: enough for planning, which reads no weights."""
    from transformers import LlamaConfig

    folder = tmp_path / "tiny-llama"
    LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(folder)
    return folder


# -- the probe -----------------------------------------------------------------------------------


def test_the_plugin_module_imports_nothing_heavy():
    imported = subprocess.run(
        [sys.executable, "-c", "import sys, tunesmith_cuda.plugin; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"],
        capture_output=True, text=True, check=True,
    )
    assert imported.stdout.strip() == "[]"


def test_a_torch_build_without_cuda_is_unavailable(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    assert cuda_probe() == Unavailable("this torch build has no CUDA support; install a CUDA build of torch")


@pytest.mark.parametrize("value", ["", "-1", " -1,0"])
def test_visible_devices_hiding_every_gpu_is_named(machine, monkeypatch, value):
    machine(A100, A100)
    monkeypatch.setenv(VISIBLE_DEVICES_VARIABLE, value)
    answer = cuda_probe()
    assert isinstance(answer, Unavailable)
    assert answer.reason == f"CUDA_VISIBLE_DEVICES={value!r} hides every GPU; unset it or list the GPUs to use (CUDA_VISIBLE_DEVICES=0,1)"


def test_no_gpu_is_unavailable(machine, monkeypatch):
    machine()
    assert cuda_probe() == Unavailable("no NVIDIA GPU found (driver missing?)")
    machine(A100, A100)
    monkeypatch.setenv(VISIBLE_DEVICES_VARIABLE, "3")  # GPU 3 of a two-GPU machine
    assert cuda_probe() == Unavailable("no NVIDIA GPU found among CUDA_VISIBLE_DEVICES='3' (driver missing?)")


def test_two_gpus_are_available_without_starting_cuda(machine):
    gpus = machine(A100, A100)
    assert cuda_probe() is True
    assert gpus.started == []
    assert gpus.calls == [], "NVML answered, so the CUDA runtime must not have been asked"


def test_where_nvml_cannot_answer_the_runtime_counts_still_without_starting_cuda(machine):
    gpus = machine(A100, nvml_installed=False)
    assert cuda_probe() is True
    assert gpus.started == [] and gpus.calls == ["cudaGetDeviceCount"]


def test_the_device_count_honours_visible_devices(machine, monkeypatch, cuda):
    machine(A100, A100, A100, A100)
    device = cuda()
    assert device.device_count() == 4
    monkeypatch.setenv(VISIBLE_DEVICES_VARIABLE, "2,3")
    assert device.device_count() == 2
    monkeypatch.setenv(VISIBLE_DEVICES_VARIABLE, "1,7")  # GPU 7 does not exist: torch stops at it
    assert device.device_count() == 1


# -- the runtime every command uses --------------------------------------------------------------


def test_the_runtime_chooses_cuda_with_nccl_without_starting_cuda(machine, tunesmith_plugin_manager):
    gpus = machine(A100, A100)
    runtime = select_runtime(tunesmith_plugin_manager)
    assert runtime.device.name == "cuda" and runtime.device.type == "cuda"
    assert runtime.device.distributed_backend == "nccl"
    assert runtime.precision == "bf16"
    assert gpus.started == [], "planning asks NVML; CUDA starts in setup"
    assert gpus.nvml.open_sessions == 0
    assert runtime.device.describe() == "cuda (NVIDIA A100-SXM4-80GB, compute capability 8.0, 2 device(s), backend nccl)"
    assert runtime.device_reason.startswith("highest priority (100) among available devices")


def test_bf16_needs_compute_capability_8(machine, tunesmith_plugin_manager):
    machine(A100)
    assert select_runtime(tunesmith_plugin_manager, "cuda", "bf16", training=True).precision == "bf16"
    machine(T4)
    assert select_runtime(tunesmith_plugin_manager, "cuda", "auto", training=True).precision == "fp16"
    assert select_runtime(tunesmith_plugin_manager, "cuda", "fp16", training=True).precision == "fp16"  # with the loss scaler
    with pytest.raises(ConfigError, match=r"--precision bf16: device 'cuda' cannot compute in bf16 .*; it supports fp32, fp16, or auto \(fp16\)"):
        select_runtime(tunesmith_plugin_manager, "cuda", "bf16", training=True)


def test_the_oldest_visible_gpu_decides_the_precision(machine, monkeypatch, cuda):
    gpus = machine(A100, T4)
    assert cuda().supported_precisions() == ("fp32", "fp16")
    monkeypatch.setenv(VISIBLE_DEVICES_VARIABLE, "0")
    assert cuda().supported_precisions() == ("fp32", "bf16", "fp16")
    monkeypatch.setenv(VISIBLE_DEVICES_VARIABLE, gpu_uuid(1))  # the T4, by its UUID
    assert cuda().supported_precisions() == ("fp32", "fp16")
    monkeypatch.setenv(VISIBLE_DEVICES_VARIABLE, gpu_uuid(0)[:6])  # a UUID prefix names a GPU too
    assert cuda().supported_precisions() == ("fp32", "bf16", "fp16")
    assert gpus.started == [] and gpus.nvml.open_sessions == 0


def test_where_nvml_cannot_answer_torch_tells_the_compute_capability(machine, cuda):
    gpus = machine(A100, T4, nvml_installed=False)
    assert cuda().supported_precisions() == ("fp32", "fp16")
    assert gpus.started == ["get_device_capability", "get_device_capability"]


# -- the hardware ----------------------------------------------------------------------------------


def test_setup_selects_the_local_ranks_gpu(machine, cuda):
    gpus = machine(A100, T4)
    device = cuda()
    assert device.setup(1) == torch.device("cuda", 1)
    device.synchronize()
    device.empty_cache()
    assert gpus.calls == ["set_device:1", "synchronize:1", "empty_cache"]
    assert device.memory_stats() == {"allocated": 2 * GiB, "peak": 4 * GiB, "total": 16 * GiB}
    assert device.describe() == "cuda (Tesla T4, compute capability 7.5, 2 device(s), backend nccl)"


def test_seeding_and_rng_state_include_the_own_gpus_generator(machine, cuda):
    gpus = machine(A100, A100)
    device = cuda()
    device.setup(1)
    device.seed(7)
    assert gpus.calls[-1] == "seed:7"
    state = device.get_rng_state()
    assert torch.equal(state["cuda"], torch.tensor([1], dtype=torch.uint8))
    gpus.generators[1] = torch.tensor([99], dtype=torch.uint8)
    device.set_rng_state(state)
    assert torch.equal(gpus.generators[1], torch.tensor([1], dtype=torch.uint8))
    assert torch.equal(gpus.generators[0], torch.tensor([0], dtype=torch.uint8)), "another process's GPU is not touched"
    del state["cuda"]  # as a checkpoint written on the CPU has it
    device.set_rng_state(state)
    assert torch.equal(gpus.generators[1], torch.tensor([1], dtype=torch.uint8))


# -- attention, QLoRA, Liger --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("gpu", "flash_attn", "precision", "expected"),
    [
        (A100, True, "bf16", "flash_attention_2"),
        (A100, True, "fp16", "flash_attention_2"),
        (A100, False, "bf16", "sdpa"),
        (A100, True, "fp32", "sdpa"),  # flash attention computes only in bf16 and fp16
        (T4, True, "fp16", "sdpa"),  # flash-attention 2 needs Ampere
    ],
)
def test_the_attention_implementation(machine, packages, cuda, gpu, flash_attn, precision, expected):
    machine(gpu)
    packages(flash_attn=flash_attn)
    device = cuda()
    device.resolve_precision(precision, training=True)
    assert device.attention_implementation() == expected


def test_qlora_without_bitsandbytes_is_refused_before_the_model_loads(machine, packages, tunesmith_plugin_manager, tmp_path):
    machine(A100)
    packages(bitsandbytes=False)
    # The model folder does not exist: the refusal must come before anything reads it.
    with pytest.raises(ConfigError, match=r"--adapter qlora: .*bitsandbytes, which is not installed; install it with: pip install 'tunesmith-cuda\[qlora\]'"):
        plan_training("sft", train_config(tmp_path, adapter="qlora"), tunesmith_plugin_manager)


@pytest.mark.parametrize(("gpu", "compute_dtype"), [(A100, torch.bfloat16), (T4, torch.float16)])
def test_qlora_quantises_to_nf4_with_double_quantisation(machine, packages, tunesmith_plugin_manager, tmp_path, gpu, compute_dtype):
    from transformers import BitsAndBytesConfig

    gpus = machine(gpu)
    packages(bitsandbytes=True)
    config = train_config(tmp_path, adapter="qlora")
    config.model = str(config_only_model(tmp_path))
    plan = plan_training("sft", config, tunesmith_plugin_manager)
    assert gpus.started == [], "planning a run starts no CUDA"
    quantization = plan.device.quantization_config("qlora")
    assert isinstance(quantization, BitsAndBytesConfig)
    assert quantization.load_in_4bit and not quantization.load_in_8bit
    assert quantization.bnb_4bit_quant_type == "nf4" and quantization.bnb_4bit_use_double_quant
    assert quantization.bnb_4bit_compute_dtype == compute_dtype


def test_liger_without_liger_kernel_is_refused_before_the_model_loads(machine, packages, tunesmith_plugin_manager, tmp_path):
    machine(A100)
    packages(liger_kernel=False)
    with pytest.raises(ConfigError, match=r"--liger: .*liger-kernel, which is not installed; install it with: pip install 'tunesmith-cuda\[liger\]'"):
        plan_training("sft", train_config(tmp_path, plugin_options={"liger": True}), tunesmith_plugin_manager)


def test_liger_is_a_flag_of_the_training_commands(tunesmith_plugin_manager, capsys):
    from tunesmith.cli import main

    declared = collect_plugin_options(tunesmith_plugin_manager)["liger"]
    assert (declared.kind, declared.owner, declared.spec.default) == ("device", "cuda", False)
    try:
        main(["sft", "--help"])  # the allow-list the fixture set lets the CLI's own manager load the plugin
    except SystemExit as done:
        assert not done.code
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--liger / --no-liger Use Liger kernels" in help_text and "(option of device cuda)" in help_text


@pytest.fixture
def liger(monkeypatch, packages):
    """liger-kernel "installed" as a stand-in recording what the device asks of it."""
    packages(liger_kernel=True)
    applied: list[dict] = []
    transformers_module = ModuleType("liger_kernel.transformers")
    transformers_module._apply_liger_kernel_to_instance = lambda **arguments: applied.append(arguments)
    transformers_module.LigerFusedLinearCrossEntropyLoss = StandInFusedLoss
    monkey_patch_module = ModuleType("liger_kernel.transformers.monkey_patch")
    monkey_patch_module.MODEL_TYPE_TO_APPLY_LIGER_FN = {"llama": None, "qwen2": None}
    for name, module in [("liger_kernel", ModuleType("liger_kernel")), ("liger_kernel.transformers", transformers_module),
                         ("liger_kernel.transformers.monkey_patch", monkey_patch_module)]:
        monkeypatch.setitem(sys.modules, name, module)
    return applied


class StandInFusedLoss(torch.nn.Module):
    """Liger's ``LigerFusedLinearCrossEntropyLoss`` as its signature is, computed in plain torch."""

    def __init__(self, ignore_index: int = -100, reduction: str = "mean"):
        super().__init__()
        self.ignore_index, self.reduction = ignore_index, reduction

    def forward(self, lin_weight, _input, target, bias=None):
        logits = torch.nn.functional.linear(_input, lin_weight, bias).float()
        return torch.nn.functional.cross_entropy(logits, target, ignore_index=self.ignore_index, reduction=self.reduction)


def tiny_model(model_type: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2))
    model.config.model_type = model_type
    return model


def test_liger_kernels_are_applied_to_the_model_instance_without_the_fused_loss(machine, liger, cuda):
    machine(A100)
    device = cuda(liger=True)
    device.check_options()
    model = tiny_model("llama")
    assert device.prepare_model(model) is model
    assert liger == [{"model": model, "fused_linear_cross_entropy": False}]


def test_liger_s_fused_loss_is_the_sft_loss_summed_over_the_target_tokens(machine, liger, cuda):
    machine(A100)
    assert cuda(liger=False).fused_linear_cross_entropy() is None
    fused = cuda(liger=True).fused_linear_cross_entropy()
    torch.manual_seed(0)
    hidden, head, targets = torch.randn(7, 16, requires_grad=True), torch.nn.Linear(16, 32), torch.randint(32, (7,))
    expected = torch.nn.functional.cross_entropy(head(hidden), targets, reduction="sum")
    torch.testing.assert_close(fused(hidden, head.weight, targets, head.bias), expected)


def test_liger_refuses_a_model_it_has_no_kernels_for(machine, liger, cuda):
    machine(A100)
    with pytest.raises(ConfigError, match="--liger: the installed liger-kernel has no kernels for model type 'gpt2'; leave --liger off"):
        cuda(liger=True).prepare_model(tiny_model("gpt2"))
    assert liger == []


def test_without_liger_the_model_is_left_alone(machine, liger, cuda):
    machine(A100)
    model = tiny_model("llama")
    assert cuda().prepare_model(model) is model
    assert liger == []
