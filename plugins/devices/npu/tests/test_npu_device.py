"""NPUDevice's own code against a stand-in torch_npu (conftest.py): what it asks the Ascend
runtime, the precisions it offers, its random generators, and what tunesmith's runtime makes of
the plugin's declarations (device type, hccl, refusals) before any model loads."""

import io
import json
from importlib import import_module
from importlib.util import find_spec

import pytest
import torch

from tunesmith.config import TrainConfig
from tunesmith.errors import ConfigError
from tunesmith.plugins import build_device
from tunesmith.runtime import plan_training, select_runtime
from tunesmith_npu.plugin import NPU_CAPABILITIES

MiB = 1024**2


@pytest.fixture
def npu(fake_npu, tunesmith_plugin_manager):
    """The npu device as tunesmith builds it from its registration."""
    return build_device(tunesmith_plugin_manager.get("device", "npu"))


def torch_knows_the_npu_type() -> bool:
    """Whether torch accepts ``"npu"`` as a device type, which it does once the real torch_npu is imported."""
    try:
        torch.device("npu")
    except RuntimeError:
        return False
    return True


def test_the_runtime_chooses_the_npu_with_hccl_and_bf16(fake_npu, tunesmith_plugin_manager):
    runtime = select_runtime(tunesmith_plugin_manager)
    device = runtime.device
    assert (device.name, device.type, device.distributed_backend) == ("npu", "npu", "hccl")
    assert device.capabilities == NPU_CAPABILITIES and device.capabilities.strategies is None
    assert runtime.precision == "bf16"
    assert runtime.describe() == (
        "device: npu (npu, 2 device(s), backend hccl), Ascend910B3, highest priority (100) among available devices; "
        "also available: cpu; precision: bf16"
    )


def test_the_device_module_imports_torch_npu_itself(torch_npu_missing):
    # It does not rely on torch's backend autoload having imported torch_npu along with torch.
    with pytest.raises(ImportError, match="torch_npu"):
        import_module("tunesmith_npu.device")


def test_device_count_is_what_the_runtime_reports(npu, fake_npu):
    # The Ascend runtime applies ASCEND_RT_VISIBLE_DEVICES before it answers.
    fake_npu.count = 4
    assert npu.device_count() == 4


def test_setup_selects_the_local_rank_then_names_its_device(npu, fake_npu):
    if torch_knows_the_npu_type():
        assert npu.setup(1) == torch.device("npu", 1)
    else:
        # A CPU-only torch refuses the type until torch_npu registers it, which the stand-in does not do.
        with pytest.raises(RuntimeError, match="device type at start of device string: npu"):
            npu.setup(1)
    assert fake_npu.calls == ["set_device:1"]


def test_synchronize_memory_and_cache_go_to_the_runtime(npu, fake_npu):
    npu.synchronize()
    npu.empty_cache()
    assert fake_npu.calls == ["synchronize", "empty_cache"]
    assert npu.memory_stats() == {"allocated": 3 * MiB, "peak": 5 * MiB}


def test_auto_is_bf16_and_fp16_training_has_a_loss_scaler(npu):
    assert npu.supported_precisions() == ("fp32", "bf16", "fp16")
    assert npu.resolve_precision("auto", training=True) == "bf16"
    assert npu.resolve_precision("fp16", training=True) == "fp16"
    scaler = npu.grad_scaler("fp16")
    assert scaler.is_enabled() and scaler._device == "npu"
    assert not npu.grad_scaler("bf16").is_enabled()


def test_a_chip_without_bf16_offers_fp32_and_fp16(npu, fake_npu):
    fake_npu.is_bf16_supported = lambda: False
    assert npu.supported_precisions() == ("fp32", "fp16")
    assert npu.resolve_precision("auto") == "fp32"
    refusal = r"device 'npu' cannot compute in bf16 \(not on this machine\); it supports fp32, fp16,"
    with pytest.raises(ConfigError, match=refusal):
        npu.resolve_precision("bf16")


def test_without_a_bf16_query_bf16_is_assumed(npu, fake_npu, monkeypatch):
    monkeypatch.delattr(fake_npu, "is_bf16_supported")
    assert npu.supported_precisions() == ("fp32", "bf16", "fp16")
    assert npu.default_precision() == "bf16"


def test_describe_names_the_chip_where_torch_npu_reports_it(npu, fake_npu, monkeypatch):
    assert npu.describe() == "npu (npu, 2 device(s), backend hccl), Ascend910B3"
    monkeypatch.delattr(fake_npu, "get_device_name")
    assert npu.describe() == "npu (npu, 2 device(s), backend hccl)"


def test_seed_seeds_the_npu_generator_too(npu, fake_npu):
    npu.seed(5)
    assert fake_npu.calls == ["manual_seed_all:5"]
    assert torch.initial_seed() == 5
    assert torch.equal(fake_npu.generator.get_state(), torch.Generator().manual_seed(5).get_state())


def test_rng_state_round_trip_includes_the_npu_generator(npu, fake_npu):
    npu.seed(7)
    buffer = io.BytesIO()
    torch.save(npu.get_rng_state(), buffer)
    expected = (torch.randn(4), torch.randn(4, generator=fake_npu.generator))

    torch.randn(100, generator=fake_npu.generator)
    torch.randn(100)
    buffer.seek(0)
    npu.set_rng_state(torch.load(buffer, weights_only=True))
    again = (torch.randn(4), torch.randn(4, generator=fake_npu.generator))
    assert torch.equal(expected[0], again[0]) and torch.equal(expected[1], again[1])


def test_a_checkpoint_from_another_device_restores_what_it_has(npu, fake_npu):
    from tunesmith.devices.cpu import CPUDevice

    npu.seed(3)
    cpu_state = CPUDevice().get_rng_state()
    expected_cpu = torch.randn(4)
    torch.randn(100, generator=fake_npu.generator)
    npu_generator = fake_npu.generator.get_state()

    npu.set_rng_state(cpu_state)
    assert torch.equal(torch.randn(4), expected_cpu)
    assert torch.equal(fake_npu.generator.get_state(), npu_generator)


# Training plans: what the runtime allows and refuses on the npu, before any model loads.


@pytest.fixture
def model_folder(tmp_path):
    """Enough of a model folder for planning, which reads no weights."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}), encoding="utf-8")
    return folder


def plan(manager, model_folder, **options):
    config = TrainConfig(model=str(model_folder), output_dir=str(model_folder.parent / "run"), **options)
    return plan_training("sft", config, manager)


WITHOUT_DEEPSPEED = pytest.mark.skipif(find_spec("deepspeed") is None, reason="deepspeed is not installed")


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", pytest.param("deepspeed", marks=WITHOUT_DEEPSPEED)])
def test_multi_process_strategies_run_one_process_per_visible_npu(fake_npu, tunesmith_plugin_manager, model_folder, strategy):
    fake_npu.count = 4
    training = plan(tunesmith_plugin_manager, model_folder, strategy=strategy, nproc_per_node="auto")
    assert training.device.name == "npu" and training.device.distributed_backend == "hccl"
    assert training.world_size == 4 and training.needs_launch
    assert training.precision == "bf16"


def test_fp16_training_is_planned_with_the_loss_scaler(fake_npu, tunesmith_plugin_manager, model_folder):
    assert plan(tunesmith_plugin_manager, model_folder, precision="fp16").precision == "fp16"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"adapter": "qlora"}, "--adapter qlora: device 'npu' cannot train on quantised weights"),
        (
            {"precision": "bf16"},
            "--precision bf16: device 'npu' cannot compute in bf16 (not on this machine); "
            "it supports fp32, fp16, or auto (fp32)",
        ),
    ],
)
def test_what_the_npu_cannot_do_is_refused_before_the_model_loads(fake_npu, tunesmith_plugin_manager, tmp_path, options, message):
    fake_npu.is_bf16_supported = lambda: False
    # The model folder does not exist: the refusal must come before anything reads it.
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        plan(tunesmith_plugin_manager, tmp_path / "no-model-needed", **options)
