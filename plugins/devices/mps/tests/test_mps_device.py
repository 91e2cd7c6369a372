"""The mps plugin's own behaviour, with its real code running on a machine without a Mac's GPU.

The hardware is faked at the narrowest seams: ``platform.mac_ver`` (which macOS this is, empty
off macOS), ``torch.backends.mps.is_built`` and ``is_available`` (what torch says of MPS), and,
for the memory and random-state checks, the ``torch.mps`` functions the device calls. The
plugin manager, the selection policy and the runtime are tunesmith's own.
"""

from __future__ import annotations

import json
import platform
import re
import subprocess
import sys

import pytest
import torch

from tunesmith.cli import main
from tunesmith.config import TrainConfig
from tunesmith.errors import ConfigError, PluginError
from tunesmith.runtime import plan_training, select_runtime

pytest.importorskip("tunesmith_mps", reason="tunesmith-mps is not installed")

from tunesmith_mps.device import MPSDevice, explain_missing_operator  # noqa: E402
from tunesmith_mps.plugin import MPS_CAPABILITIES, mps_probe  # noqa: E402

#: torch's message for an operator MPS lacks (aten/src/ATen/mps/MPSFallback.mm), as torch 2.13 raises it
MISSING_OPERATOR_MESSAGE = (
    "The operator 'aten::_ctc_loss' is not currently implemented for the MPS device. If you want this op to be "
    "considered for addition please comment on https://github.com/pytorch/pytorch/issues/141287 and mention use-case, "
    "that resulted in missing op as well as commit hash 0123456789abcdef0123456789abcdef01234567. As a temporary fix, "
    "you can set the environment variable `PYTORCH_ENABLE_MPS_FALLBACK=1` to use the CPU as a fallback for this op. "
    "WARNING: this will be slower than running natively on MPS."
)


@pytest.fixture
def machine(monkeypatch):
    """``machine(macos="14.5", built=True, available=True)`` makes this process see that Mac; ``macos=""`` is not a Mac."""

    def pretend(macos: str = "14.5", built: bool = True, available: bool = True) -> None:
        monkeypatch.setattr(platform, "mac_ver", lambda: (macos, ("", "", ""), "arm64" if macos else ""))
        monkeypatch.setattr(torch.backends.mps, "is_built", lambda: built)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: available)

    return pretend


# The probe


@pytest.mark.parametrize(
    ("macos", "built", "available", "reason"),
    [
        ("", True, True, "MPS needs macOS on Apple silicon; this is "),
        ("14.5", False, False, "this torch build has no MPS support"),
        ("12.1", True, False, "torch's MPS backend needs macOS 12.3 or later; this Mac runs macOS 12.1"),
        ("14.5", True, False, "torch finds no GPU for MPS on this Mac (macOS 14.5): MPS needs Apple silicon's GPU"),
    ],
)
def test_the_probe_says_why_mps_is_unavailable(machine, macos, built, available, reason):
    machine(macos, built, available)
    answer = mps_probe()
    assert not answer and answer.reason.startswith(reason), answer


def test_the_probe_finds_a_mac_gpu(machine):
    machine("14.5")
    assert mps_probe() is True


def test_off_macos_neither_the_plugin_nor_its_probe_imports_torch():
    script = (
        "import platform, sys\n"
        "platform.mac_ver = lambda: ('', ('', '', ''), '')\n"
        "from tunesmith_mps.plugin import mps_probe\n"
        "answer = mps_probe()\n"
        "print(type(answer).__name__, 'torch' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["Unavailable", "False"]


def test_the_reason_reaches_the_device_list(machine, tunesmith_plugin_manager):
    machine("13.6", available=False)
    (mps,) = [candidate for candidate in tunesmith_plugin_manager.device_candidates() if candidate.name == "mps"]
    assert not mps.available and mps.reason.startswith("torch finds no GPU for MPS on this Mac (macOS 13.6)")


# Selection: the runtime every command uses


def test_auto_picks_mps_over_the_cpu_as_an_mps_device_without_collectives(machine, tunesmith_plugin_manager):
    machine("14.5")
    runtime = select_runtime(tunesmith_plugin_manager)
    device = runtime.device
    assert isinstance(device, MPSDevice) and device.name == "mps" and device.type == "mps"
    assert device.capabilities == MPS_CAPABILITIES and device.distributed_backend is None and device.device_count() == 1
    assert runtime.device_reason.startswith("highest priority (50) among available devices; also available: cpu")
    assert device.setup(0) == torch.device("mps")


def test_an_unavailable_mps_is_refused_not_replaced_by_the_cpu(machine, tunesmith_plugin_manager):
    machine("14.5", available=False)
    with pytest.raises(PluginError, match=r"--device mps: the device is installed but not available here \(.+\); installed devices: .*mps \(unavailable"):
        select_runtime(tunesmith_plugin_manager, "mps")
    assert select_runtime(tunesmith_plugin_manager).device.name == "cpu"  # only auto may choose another device


# Precision by macOS version


@pytest.mark.parametrize(
    ("macos", "supported", "auto"),
    [("14.0", ("fp32", "bf16", "fp16"), "bf16"), ("15.3", ("fp32", "bf16", "fp16"), "bf16"), ("13.6", ("fp32", "fp16"), "fp32")],
)
def test_bf16_is_offered_from_macos_14(machine, tunesmith_plugin_manager, macos, supported, auto):
    machine(macos)
    runtime = select_runtime(tunesmith_plugin_manager, "mps", "auto", training=True)
    assert runtime.device.supported_precisions() == supported and runtime.precision == auto


def test_bf16_before_macos_14_is_refused_naming_the_device_and_what_works(machine, tunesmith_plugin_manager):
    machine("13.6")
    expected = "--precision bf16: device 'mps' cannot compute in bf16 (not on this machine); it supports fp32, fp16, or auto (fp32)"
    with pytest.raises(ConfigError, match=re.escape(expected)):
        select_runtime(tunesmith_plugin_manager, "mps", "bf16")


def test_fp16_runs_inference_but_training_needs_a_loss_scaler_mps_does_not_declare(machine, tunesmith_plugin_manager):
    machine("14.5")
    assert select_runtime(tunesmith_plugin_manager, "mps", "fp16").precision == "fp16"
    with pytest.raises(ConfigError, match=re.escape("training in fp16 needs loss scaling, which device 'mps' does not offer; use fp32 or bf16")):
        select_runtime(tunesmith_plugin_manager, "mps", "fp16", training=True)


# One process only

DDP_REFUSAL = "--strategy ddp: device 'mps' runs only single"


@pytest.fixture
def train_files(tmp_path):
    data = tmp_path / "train.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"Say {i}."}, {"role": "assistant", "content": f"{i}."}]} for i in range(2)]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return {"dataset": str(data), "model": str(tmp_path / "no-model-needed"), "output_dir": str(tmp_path / "run")}


def test_a_distributed_strategy_is_refused_by_the_training_plan(machine, tunesmith_plugin_manager, train_files):
    machine("14.5")
    config = TrainConfig(
        model=train_files["model"], dataset=(train_files["dataset"],), output_dir=train_files["output_dir"], device="mps", strategy="ddp"
    )
    with pytest.raises(ConfigError, match=re.escape(DDP_REFUSAL)):
        plan_training("sft", config, tunesmith_plugin_manager)


def test_a_distributed_strategy_is_refused_by_the_command_line(machine, tunesmith_plugin_manager, train_files, capsys):
    # The command builds its own plugin manager; the fixture's allow-list lets it see tunesmith-mps.
    machine("14.5")
    args = ["sft", "--device", "mps", "--strategy", "ddp", "--model", train_files["model"], "--dataset", train_files["dataset"],
            "--output-dir", train_files["output_dir"]]
    with pytest.raises(SystemExit) as exited:
        main(args)
    assert exited.value.code == 2
    assert capsys.readouterr().err.strip() == f"error: {DDP_REFUSAL}"


# What the device asks of torch.mps


def test_peak_memory_is_the_most_any_call_has_seen(monkeypatch):
    allocations = iter([100, 300, 200])
    monkeypatch.setattr(torch.mps, "current_allocated_memory", lambda: next(allocations))
    monkeypatch.setattr(torch.mps, "driver_allocated_memory", lambda: 4096)
    device = MPSDevice()
    assert [device.memory_stats() for _ in range(3)] == [
        {"allocated": 100, "peak": 100, "driver_allocated": 4096},
        {"allocated": 300, "peak": 300, "driver_allocated": 4096},
        {"allocated": 200, "peak": 300, "driver_allocated": 4096},
    ]


class PretendMPSGenerator:
    """Stands in for torch's MPS generator: its state is one seed, as a tensor."""

    def __init__(self):
        self.state = torch.tensor([0], dtype=torch.uint8)

    def manual_seed(self, seed):
        self.state = torch.tensor([seed % 256], dtype=torch.uint8)

    def get_state(self):
        return self.state.clone()

    def set_state(self, state):
        self.state = state.clone()


def test_seed_and_rng_state_include_the_mps_generator(monkeypatch):
    generator = PretendMPSGenerator()
    monkeypatch.setattr(torch.mps, "manual_seed", generator.manual_seed)
    monkeypatch.setattr(torch.mps, "get_rng_state", generator.get_state)
    monkeypatch.setattr(torch.mps, "set_rng_state", generator.set_state)
    device = MPSDevice()
    device.seed(7)
    saved = device.get_rng_state()
    assert torch.equal(saved["mps"], torch.tensor([7], dtype=torch.uint8))
    generator.manual_seed(99)
    device.set_rng_state(saved)
    assert torch.equal(generator.state, torch.tensor([7], dtype=torch.uint8))
    device.set_rng_state({key: value for key, value in saved.items() if key != "mps"})  # written on another device
    assert torch.equal(generator.state, torch.tensor([7], dtype=torch.uint8))


def test_describe_names_the_gpu_and_macos(machine, monkeypatch, tunesmith_plugin_manager):
    machine("14.5")
    monkeypatch.setattr(torch.backends.mps, "get_name", lambda: "Apple M2")
    device = select_runtime(tunesmith_plugin_manager, "mps").device
    assert device.describe() == "mps (mps, 1 device(s), backend None), Apple M2 on macOS 14.5"


# Operators MPS lacks


def test_a_missing_operator_is_explained_with_the_fallback_variable():
    message = explain_missing_operator(NotImplementedError(MISSING_OPERATOR_MESSAGE))
    assert message is not None
    assert MPSDevice().explain_error(NotImplementedError(MISSING_OPERATOR_MESSAGE)) == message  # what a training command shows
    assert message.startswith(f"the operator aten::_ctc_loss is not implemented for the MPS device in torch {torch.__version__}")
    assert "PYTORCH_ENABLE_MPS_FALLBACK=1" in message and "on the CPU instead: slower" in message


@pytest.mark.parametrize(
    "error",
    [NotImplementedError("Could not run 'aten::_ctc_loss' with arguments from the 'Meta' backend"), KeyError("mps")],
)
def test_other_errors_are_left_alone(error):
    assert explain_missing_operator(error) is None
