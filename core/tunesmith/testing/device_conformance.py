"""The device conformance suite: a pytest plugin every device plugin runs against itself.

It checks that a registered device (its :class:`~tunesmith.records.DeviceSpec` and its
:class:`~tunesmith.device.Device` subclass) honours the interface the training loop relies on.
The device is looked up by name through the real plugin manager, so the entry point, the
``TUNESMITH_PLUGINS`` allow-list and the dotted path are exercised too.

Use it from the device distribution's tests. In the top-level ``conftest.py``::

    import pytest

    pytest_plugins = ["tunesmith.testing"]

    @pytest.fixture
    def tunesmith_device_name():
        return "npu"

and in a test module::

    from tunesmith.testing import DeviceConformance

    class TestNPUDevice(DeviceConformance):
        pass

When the probe says the hardware is absent, the checks of the spec and the probe still run and
every check that needs the hardware is skipped, so the suite can run in CI without it. To build
the plugin manager differently (to opt in to a plugin the allow-list hides, or to register an
in-test plugin object), override the ``tunesmith_plugin_manager`` fixture.
"""

from __future__ import annotations

import io
import os
import random
import time

import pytest
import torch

from tunesmith.device import PRECISION_DTYPES, Device
from tunesmith.errors import ConfigError, PluginError
from tunesmith.plugins import ALLOW_LIST_VARIABLE, PluginManager, build_device, create_plugin_manager
from tunesmith.records import NAME_PATTERN, PRECISION_NAMES, DeviceCapabilities, Registered, Unavailable

#: a probe runs on every ``tunesmith`` invocation, so it must not initialise the hardware
PROBE_TIME_LIMIT_S = 2.0


@pytest.fixture
def tunesmith_device_name() -> str:
    """The registered name of the device under test; override it in your conftest."""
    pytest.fail(
        "the tunesmith device conformance suite needs to know which device to test: "
        "define a fixture `tunesmith_device_name` returning its registered name (e.g. 'npu')",
        pytrace=False,
    )


@pytest.fixture
def tunesmith_plugin_manager() -> PluginManager:
    """The plugin manager the device is taken from; override it to build one differently."""
    return create_plugin_manager()


@pytest.fixture
def tunesmith_device_registration(tunesmith_plugin_manager, tunesmith_device_name) -> Registered:
    try:
        return tunesmith_plugin_manager.get("device", tunesmith_device_name)
    except PluginError as error:
        allow_list = os.environ.get(ALLOW_LIST_VARIABLE)
        pytest.fail(
            f"{error}. Is its distribution installed, and allowed by {ALLOW_LIST_VARIABLE} "
            f"(currently {'unset' if allow_list is None else repr(allow_list)})?",
            pytrace=False,
        )


@pytest.fixture
def tunesmith_device_available(tunesmith_device_registration) -> bool:
    return bool(tunesmith_device_registration.spec.probe())


@pytest.fixture
def tunesmith_device(tunesmith_device_registration, tunesmith_device_available) -> Device:
    """An instance of the device class, named as the registry names it; skips without the hardware."""
    spec = tunesmith_device_registration.spec
    if not tunesmith_device_available:
        pytest.skip(f"device {spec.name!r} is installed but its probe says it is not available here")
    return build_device(tunesmith_device_registration)


@pytest.fixture
def tunesmith_torch_device(tunesmith_device) -> torch.device:
    """The ``torch.device`` of local rank 0, after ``setup``."""
    return tunesmith_device.setup(0)


class DeviceConformance:
    """Checks every device must pass. Subclass it as ``Test...`` in your test module."""

    # The registration

    def test_spec_is_registered_under_a_valid_name(self, tunesmith_device_registration, tunesmith_device_name):
        spec = tunesmith_device_registration.spec
        assert spec.name == tunesmith_device_name
        assert NAME_PATTERN.match(spec.name)
        assert isinstance(spec.priority, int) and not isinstance(spec.priority, bool)

    def test_spec_names_a_device_subclass(self, tunesmith_device_registration, tunesmith_device_available):
        try:
            device_class = tunesmith_device_registration.spec.load()
        except ImportError as error:
            if tunesmith_device_available:
                raise
            pytest.skip(f"the device module needs what is not installed here: {error}")
        assert isinstance(device_class, type) and issubclass(device_class, Device)
        assert isinstance(device_class.type, str) and torch.device(device_class.type).type == device_class.type

    def test_capabilities_are_declared(self, tunesmith_device_registration):
        capabilities = tunesmith_device_registration.spec.capabilities
        assert isinstance(capabilities, DeviceCapabilities)
        assert capabilities.distributed_backend is None or (isinstance(capabilities.distributed_backend, str) and capabilities.distributed_backend)
        if capabilities.strategies is not None:
            assert all(isinstance(name, str) and NAME_PATTERN.match(name) for name in capabilities.strategies)
            if capabilities.distributed_backend is None:
                assert capabilities.strategies == ("single",), "a device without a collective backend runs only the single strategy"
        if capabilities.grad_scaler:
            assert "fp16" in capabilities.precisions, "a loss scaler is for fp16 training"

    def test_probe_answers_quickly_with_true_or_a_reason(self, tunesmith_device_registration):
        start = time.perf_counter()
        answer = tunesmith_device_registration.spec.probe()
        elapsed = time.perf_counter() - start
        assert answer is True or answer is False or (isinstance(answer, Unavailable) and answer.reason), answer
        assert elapsed < PROBE_TIME_LIMIT_S, f"the probe took {elapsed:.2f} s; it must not initialise the hardware"

    # The hardware

    def test_device_count_is_positive_when_available(self, tunesmith_device):
        count = tunesmith_device.device_count()
        assert isinstance(count, int) and count >= 1

    def test_setup_returns_a_torch_device_of_its_type(self, tunesmith_device, tunesmith_torch_device):
        assert isinstance(tunesmith_torch_device, torch.device)
        assert tunesmith_torch_device.type == tunesmith_device.type

    def test_tensors_and_a_matmul_run_on_it(self, tunesmith_device, tunesmith_torch_device):
        a = torch.arange(12, dtype=torch.float32).reshape(3, 4)
        b = torch.arange(8, dtype=torch.float32).reshape(4, 2)
        product = a.to(tunesmith_torch_device) @ b.to(tunesmith_torch_device)
        tunesmith_device.synchronize()
        assert product.device.type == tunesmith_device.type
        torch.testing.assert_close(product.cpu(), a @ b)

    def test_synchronize_returns(self, tunesmith_device, tunesmith_torch_device):
        torch.ones(4, device=tunesmith_torch_device).sum()
        assert tunesmith_device.synchronize() is None

    def test_memory_stats_report_allocated_and_peak_bytes(self, tunesmith_device, tunesmith_torch_device):
        if not tunesmith_device.capabilities.memory_stats:
            pytest.skip(f"{tunesmith_device.name} declares no memory reporting")
        torch.ones(1024, device=tunesmith_torch_device)
        stats = tunesmith_device.memory_stats()
        for key in ("allocated", "peak"):
            assert isinstance(stats.get(key), int) and not isinstance(stats[key], bool), f"{key}: {stats.get(key)!r}"
            assert stats[key] >= 0
        assert stats["peak"] >= stats["allocated"]

    def test_empty_cache_returns(self, tunesmith_device, tunesmith_torch_device):
        assert tunesmith_device.empty_cache() is None

    def test_describe_is_one_line(self, tunesmith_device):
        description = tunesmith_device.describe()
        assert isinstance(description, str) and description and "\n" not in description

    # Precision

    def test_supported_precisions_are_declared_ones_and_include_fp32(self, tunesmith_device):
        supported = tunesmith_device.supported_precisions()
        assert isinstance(supported, tuple)
        assert "fp32" in supported
        assert set(supported) <= set(tunesmith_device.capabilities.precisions), "a device may narrow what it declared, never widen it"

    def test_default_precision_is_supported(self, tunesmith_device):
        assert tunesmith_device.default_precision() in tunesmith_device.supported_precisions()

    def test_resolve_precision(self, tunesmith_device):
        assert tunesmith_device.resolve_precision("auto") == tunesmith_device.default_precision()
        for precision in tunesmith_device.supported_precisions():
            assert tunesmith_device.resolve_precision(precision) == precision
        with pytest.raises(ConfigError):
            tunesmith_device.resolve_precision("fp8")

    def test_a_precision_it_lacks_is_refused_naming_the_device_and_what_works(self, tunesmith_device):
        for precision in PRECISION_NAMES:
            if precision not in tunesmith_device.supported_precisions():
                with pytest.raises(ConfigError, match=f"device {tunesmith_device.name!r} cannot compute in {precision}.*it supports fp32"):
                    tunesmith_device.resolve_precision(precision)

    def test_fp16_training_needs_the_declared_loss_scaler(self, tunesmith_device, tunesmith_torch_device):
        if "fp16" not in tunesmith_device.supported_precisions():
            pytest.skip(f"{tunesmith_device.name} does not compute in fp16")
        if not tunesmith_device.capabilities.grad_scaler:
            with pytest.raises(ConfigError, match="needs loss scaling"):
                tunesmith_device.resolve_precision("fp16", training=True)
            return
        assert tunesmith_device.resolve_precision("fp16", training=True) == "fp16"
        weight = torch.ones(4, device=tunesmith_torch_device, requires_grad=True)
        optimizer = torch.optim.SGD([weight], lr=1.0)
        scaler = tunesmith_device.grad_scaler("fp16")
        assert scaler.is_enabled()
        scaler.scale((weight * 2).sum()).backward()
        scaler.step(optimizer)
        scaler.update()
        torch.testing.assert_close(weight.detach().cpu(), torch.full((4,), -1.0))
        assert not tunesmith_device.grad_scaler("fp32").is_enabled()

    def test_every_command_gets_it_through_the_runtime(self, tunesmith_plugin_manager, tunesmith_device):
        from tunesmith.runtime import select_runtime

        runtime = select_runtime(tunesmith_plugin_manager, tunesmith_device.name, "auto")
        assert runtime.device.name == tunesmith_device.name and runtime.device.capabilities == tunesmith_device.capabilities
        assert runtime.precision == tunesmith_device.default_precision()

    @pytest.mark.parametrize("precision", PRECISION_NAMES)
    def test_autocast_computes_a_matmul_in_the_precision(self, tunesmith_device, tunesmith_torch_device, precision):
        if precision not in tunesmith_device.supported_precisions():
            pytest.skip(f"{tunesmith_device.name} does not support {precision}")
        a = torch.randn(8, 16, device=tunesmith_torch_device)
        b = torch.randn(16, 4, device=tunesmith_torch_device)
        with tunesmith_device.autocast(precision):
            product = a @ b
        assert product.dtype == PRECISION_DTYPES[precision]
        torch.testing.assert_close(product.float(), a @ b, atol=0.1, rtol=0.05)

    # Randomness

    def test_seed_makes_random_numbers_reproducible(self, tunesmith_device, tunesmith_torch_device):
        def draw(seed):
            tunesmith_device.seed(seed)
            return torch.randn(16, device=tunesmith_torch_device).cpu()

        assert torch.equal(draw(1234), draw(1234))
        assert not torch.equal(draw(1234), draw(1235))

    def test_rng_state_survives_a_checkpoint_round_trip(self, tunesmith_device, tunesmith_torch_device):
        tunesmith_device.seed(7)
        buffer = io.BytesIO()
        torch.save(tunesmith_device.get_rng_state(), buffer)
        expected = (torch.randn(16, device=tunesmith_torch_device).cpu(), random.random())

        torch.randn(100, device=tunesmith_torch_device)
        buffer.seek(0)
        tunesmith_device.set_rng_state(torch.load(buffer, weights_only=True))
        again = (torch.randn(16, device=tunesmith_torch_device).cpu(), random.random())
        assert torch.equal(expected[0], again[0]) and expected[1] == again[1]
