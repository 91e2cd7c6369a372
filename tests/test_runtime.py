"""One runtime for every command: the device and precision are chosen in one place, and what a
device declares it cannot do is refused there, naming the device, the option and what works,
before any model loads."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import chat_rows, run_cli, write_jsonl
from tunesmith import DeviceCapabilities, DeviceSpec, OptionSpec, Unavailable, hookimpl
from tunesmith.config import TrainConfig
from tunesmith.devices.cpu import CPUDevice
from tunesmith.errors import ConfigError, PluginError
from tunesmith.plugins import create_plugin_manager
from tunesmith.runtime import plan_training, select_runtime

#: a Mac-like device: no collectives, one strategy, fp16 without a loss scaler
SOLO = DeviceCapabilities(precisions=("fp32", "fp16"), distributed_backend=None, strategies=("single",))


class QuantisingDevice(CPUDevice):
    """Offers QLoRA and a --turbo option that needs a package this machine lacks."""

    def check_options(self):
        if self.options["turbo"]:
            raise ConfigError("--turbo: the turbo-kernels package is not installed")

    def quantization_config(self, adapter):
        return {"load_in_4bit": True}


class SoloPlugin:
    @hookimpl
    def tunesmith_register_devices(self):
        return [
            DeviceSpec(name="solo", device=CPUDevice, probe=lambda: True, priority=50, capabilities=SOLO),
            DeviceSpec(name="absent", device=CPUDevice, probe=lambda: Unavailable("the absent driver is not installed"), priority=60),
            DeviceSpec(
                name="quantising", device=QuantisingDevice, probe=lambda: True, priority=5,
                capabilities=DeviceCapabilities(precisions=("fp32",), distributed_backend="gloo", quantization=("qlora",)),
                options=(OptionSpec("turbo", False, "Use the turbo kernels."),),
            ),
        ]


@pytest.fixture
def manager():
    manager = create_plugin_manager()
    manager.register(SoloPlugin(), "solo")
    return manager


def config_for(tmp_path, **options) -> TrainConfig:
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(2))
    return TrainConfig(model=str(tmp_path / "no-model-needed"), dataset=(str(data),), output_dir=str(tmp_path / "run"), **options)


def test_the_runtime_picks_the_device_and_its_capabilities(manager):
    runtime = select_runtime(manager)
    assert runtime.device.name == "solo" and runtime.device.capabilities == SOLO and runtime.device.distributed_backend is None
    assert runtime.precision == "fp32"
    assert runtime.describe().startswith("device: solo (cpu, 1 device(s), backend None), highest priority (50) among available devices")
    assert select_runtime(manager, "solo", "fp16").precision == "fp16"  # inference needs no loss scaler


def test_an_unavailable_device_says_why(manager):
    (absent,) = [candidate for candidate in manager.device_candidates() if candidate.name == "absent"]
    assert not absent.available and absent.reason == "the absent driver is not installed"
    with pytest.raises(PluginError, match="--device absent: the device is installed but not available here"):
        select_runtime(manager, "absent")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"precision": "bf16"}, "--precision bf16: device 'solo' cannot compute in bf16; it supports fp32, fp16, or auto (fp32)"),
        ({"precision": "fp16"}, "--precision fp16: training in fp16 needs loss scaling, which device 'solo' does not offer; use fp32"),
        ({"strategy": "ddp"}, "--strategy ddp: device 'solo' runs only single"),
        ({"adapter": "qlora"}, "--adapter qlora: device 'solo' cannot train on quantised weights; QLoRA needs a device that declares it"),
        ({"device": "quantising", "adapter": "qlora", "strategy": "fsdp"}, "--adapter qlora runs with --strategy single or ddp, not fsdp"),
        ({"device": "quantising", "plugin_options": {"turbo": True}}, "--turbo: the turbo-kernels package is not installed"),
    ],
)
def test_what_the_device_cannot_do_is_refused_before_the_model_loads(manager, tmp_path, options, message):
    # The model folder does not exist: the refusal must come before anything tries to read it.
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        plan_training("sft", config_for(tmp_path, **options), manager)


def test_a_device_declares_its_own_options(manager, tmp_path, tiny_model_dir):
    from tunesmith.config import collect_plugin_options

    declared = collect_plugin_options(manager)["turbo"]
    assert (declared.kind, declared.owner) == ("device", "quantising")
    config = config_for(tmp_path, device="quantising", adapter="qlora", plugin_options={"turbo": False})
    config.model = str(tiny_model_dir)
    plan = plan_training("sft", config, manager)
    assert plan.device.options == {"turbo": False} and plan.device.quantization_config("qlora") == {"load_in_4bit": True}


def test_the_readme_capability_matrix_is_the_one_the_declarations_print(capsys, monkeypatch):
    # The device plugins of this repository (make install puts them in the venv) and the built-in cpu.
    monkeypatch.setenv("TUNESMITH_PLUGINS", "tunesmith-cuda,tunesmith-npu,tunesmith-mps")
    assert run_cli("devices", "--markdown") == 0
    printed = capsys.readouterr().out.strip()
    lines = printed.splitlines()
    assert lines[0] == "| | `cuda` | `npu` | `mps` | `cpu` |"
    assert "| collectives | nccl | hccl | none: one process | gloo |" in lines and "| strategies | all | all | single | all |" in lines
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    start = readme.index("<!-- capability matrix: generated by `tunesmith devices --markdown` -->\n")
    shown = readme[readme.index("\n", start) + 1 : readme.index("<!-- end of capability matrix -->")].strip()
    assert shown == printed, "regenerate the README's matrix with `tunesmith devices --markdown`"


LIGHT_COMMANDS = """
import sys
from tunesmith.cli import main
for argv in (["--help"], ["plugins"], ["env"], ["devices"], ["sft", "--help"]):
    try:
        main(argv)
    except SystemExit as done:
        assert not done.code, (argv, done.code)
heavy = sorted(name for name in ("torch", "transformers", "peft", "deepspeed") if name in sys.modules)
print(f"heavy:{','.join(heavy)}")
"""


def test_import_and_the_light_commands_load_no_torch():
    imported = subprocess.run(
        [sys.executable, "-c", "import sys, tunesmith; print(sorted(m for m in ('torch', 'torch_npu', 'deepspeed', 'megatron', "
                               "'bitsandbytes', 'transformers') if m in sys.modules))"],
        capture_output=True, text=True, check=True,
    )
    assert imported.stdout.strip() == "[]"
    commands = subprocess.run([sys.executable, "-c", LIGHT_COMMANDS], capture_output=True, text=True)
    assert commands.returncode == 0, commands.stderr
    assert commands.stdout.splitlines()[-1] == "heavy:", commands.stdout[-2000:]
