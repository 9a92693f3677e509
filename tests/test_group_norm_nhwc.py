"""The channels-last GroupNorm in C (trainer/model/group_norm_nhwc.py) against PyTorch's GroupNorm."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from trainer import native_library
from trainer.model import group_norm_nhwc
from trainer.model.group_norm_nhwc import GroupNormNHWC


def test_this_machine_builds_it():
    assert group_norm_nhwc.LIBRARY.load() is not None


def reference(x, module, dy):
    """F.group_norm on an NCHW float32 copy: output and the gradients of x, weight and bias."""
    x32 = x.detach().float().contiguous().requires_grad_()
    weight = module.weight.detach().clone().requires_grad_()
    bias = module.bias.detach().clone().requires_grad_()
    y = F.group_norm(x32, module.num_groups, weight, bias, module.eps)
    y.backward(dy.float())
    return y, x32.grad, weight.grad, bias.grad


@pytest.mark.parametrize("shape", [(3, 16, 5, 7), (2, 128, 4, 4), (1, 8, 64, 64), (2, 64, 1, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_and_backward_match_pytorch(shape, dtype):
    generator = torch.Generator().manual_seed(sum(shape))
    module = GroupNormNHWC(shape[1] // 4, shape[1])
    with torch.no_grad():
        module.weight.copy_(torch.randn(shape[1], generator=generator))
        module.bias.copy_(torch.randn(shape[1], generator=generator))
    x = (3 * torch.randn(shape, generator=generator) + 2).to(dtype)
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    dy = torch.randn(shape, generator=generator).to(dtype)
    if shape[2] * shape[3] > 1:
        assert group_norm_nhwc.supports(x, module), "the case must take the C path"
    y = module(x)
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
    y.backward(dy)
    y_ref, dx_ref, dw_ref, db_ref = reference(x, module, dy)
    # float32: the same arithmetic up to summation order; bfloat16: one rounding of the output.
    tolerance = {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 0.05, "rtol": 0.02}
    torch.testing.assert_close(y.float(), y_ref, **tolerance)
    torch.testing.assert_close(x.grad.float(), dx_ref, **tolerance)
    # Parameter gradients are summed in float32 by both, from the same (bf16-rounded) inputs.
    torch.testing.assert_close(module.weight.grad, dw_ref, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(module.bias.grad, db_ref, atol=1e-3, rtol=1e-3)


def test_float32_gradients_pass_gradcheck_against_finite_differences():
    """The backward formula itself, in float32, against the forward's own finite differences."""
    generator = torch.Generator().manual_seed(3)
    module = GroupNormNHWC(2, 8)
    x = torch.randn(2, 8, 3, 3, generator=generator).contiguous(memory_format=torch.channels_last)
    dy = torch.randn(2, 8, 3, 3, generator=generator)
    x.requires_grad_()
    (module(x) * dy).sum().backward()
    step = 1e-2
    for index in [(0, 0, 0, 0), (1, 5, 2, 1), (0, 7, 1, 2)]:
        with torch.no_grad():
            plus, minus = x.clone(), x.clone()
            plus[index] += step
            minus[index] -= step
            numeric = ((module(plus) - module(minus)) * dy).sum() / (2 * step)
        assert abs(numeric.item() - x.grad[index].item()) < 2e-3


def test_nchw_and_other_inputs_take_pytorch_s_path_exactly():
    module = GroupNormNHWC(4, 16)
    x = torch.randn(2, 16, 6, 6)
    assert not group_norm_nhwc.supports(x, module)
    assert torch.equal(module(x), F.group_norm(x, 4, module.weight, module.bias, module.eps))
    assert not group_norm_nhwc.supports(x.double().contiguous(memory_format=torch.channels_last), module)


def test_state_dict_keys_are_those_of_nn_group_norm():
    assert GroupNormNHWC(4, 16).state_dict().keys() == torch.nn.GroupNorm(4, 16).state_dict().keys()


def test_without_a_compiler_pytorch_s_group_norm_runs_after_one_warning(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(group_norm_nhwc.LIBRARY, "_tried", False)
    monkeypatch.setattr(group_norm_nhwc.LIBRARY, "_library", None)
    monkeypatch.setenv("UNSUP3D_CACHE", str(tmp_path))
    monkeypatch.setattr(native_library, "compiler", lambda: None)
    module = GroupNormNHWC(4, 16)
    x = torch.randn(2, 16, 6, 6).contiguous(memory_format=torch.channels_last)
    with caplog.at_level(logging.WARNING, logger="trainer.model.group_norm_nhwc"):
        first, second = module(x), module(x)
    assert len([r for r in caplog.records if "no C compiler" in r.getMessage()]) == 1
    expected = F.group_norm(x, 4, module.weight, module.bias, module.eps)
    torch.testing.assert_close(first, expected)
    torch.testing.assert_close(second, expected)
