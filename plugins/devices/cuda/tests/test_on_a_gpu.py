"""What only a real GPU shows; skipped elsewhere (CI has none).

Run on a machine with an NVIDIA GPU: ``cd plugins/devices/cuda && python -m pytest -q tests/test_on_a_gpu.py``.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from tunesmith.plugins import build_device

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None, reason="needs liger-kernel")
def test_liger_s_fused_loss_equals_the_plain_cross_entropy_in_value_and_gradient(tunesmith_plugin_manager):
    fused = build_device(tunesmith_plugin_manager.get("device", "cuda"), {"liger": True}).fused_linear_cross_entropy()
    torch.manual_seed(0)
    hidden = torch.randn(300, 64, device="cuda", requires_grad=True)
    weight = torch.randn(4096, 64, device="cuda", requires_grad=True)
    targets = torch.randint(4096, (300,), device="cuda")
    plain_hidden, plain_weight = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    loss = fused(hidden, weight, targets, None)
    plain = torch.nn.functional.cross_entropy(plain_hidden @ plain_weight.T, targets, reduction="sum")
    loss.backward()
    plain.backward()
    torch.testing.assert_close(loss, plain, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(hidden.grad, plain_hidden.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(weight.grad, plain_weight.grad, rtol=1e-4, atol=1e-5)
