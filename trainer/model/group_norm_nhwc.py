"""GroupNorm of channels-last CPU maps in C (group_norm_nhwc.c), forward and backward (issue 14).

With `engine.channels_last` the nets' convolutions read and write NHWC maps, which oneDNN takes
without the layout reorders it runs around every NCHW convolution (a quarter of its time here). But
PyTorch's CPU GroupNorm is several times slower on channels-last maps than on NCHW ones (its
backward above all: 66 against 5 ms per training step of the default nets), which made the layout a
loss. GroupNormNHWC computes the same function as nn.GroupNorm (the same parameters and state_dict
keys) and hands channels-last float32 or bfloat16 CPU maps to the C loops; any other input takes
nn.GroupNorm's own path, as does every input where no C compiler works (one warning).
"""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path

import torch
from torch import nn

from trainer.native_library import NativeLibrary

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("group_norm_nhwc.c")
_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16"}


def _declare(library: ctypes.CDLL) -> None:
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    for suffix in _SUFFIX.values():
        forward = getattr(library, f"unsup3d_group_norm_nhwc_forward_{suffix}")
        forward.restype = size
        forward.argtypes = [pointer] * 4 + [size] * 4 + [ctypes.c_float] + [pointer] * 2
        backward = getattr(library, f"unsup3d_group_norm_nhwc_backward_{suffix}")
        backward.restype = size
        backward.argtypes = [pointer] * 5 + [size] * 4 + [pointer] * 3


LIBRARY = NativeLibrary(SOURCE, _declare, "PyTorch's GroupNorm (slow on channels-last maps)", log)


def supports(x: torch.Tensor, module: nn.GroupNorm) -> bool:
    """Whether the C loops take this input: a channels-last float32/bfloat16 CPU map, affine GroupNorm."""
    return (x.device.type == "cpu" and x.dim() == 4 and x.dtype in _SUFFIX and module.affine
            and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
            and x.shape[1] <= 4096)


class _GroupNormNHWC(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, groups: int, weight, bias, eps: float):
        n, c, h, w = x.shape
        y = torch.empty_like(x, memory_format=torch.channels_last)
        mean = torch.empty(n * groups)
        rstd = torch.empty(n * groups)
        gamma = weight.detach().float().contiguous()
        beta = bias.detach().float().contiguous()
        status = getattr(LIBRARY.load(), f"unsup3d_group_norm_nhwc_forward_{_SUFFIX[x.dtype]}")(
            x.data_ptr(), y.data_ptr(), gamma.data_ptr(), beta.data_ptr(), n, h * w, c, groups, eps,
            mean.data_ptr(), rstd.data_ptr())
        if status != 0:
            raise ValueError(f"GroupNorm: {c} channels in {groups} groups is not a layout the C loops take")
        ctx.save_for_backward(x, mean, rstd, gamma)
        ctx.groups = groups
        ctx.parameter_dtypes = (weight.dtype, bias.dtype)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, mean, rstd, gamma = ctx.saved_tensors
        n, c, h, w = x.shape
        dy = dy.to(x.dtype).contiguous(memory_format=torch.channels_last)
        dx = torch.empty_like(x, memory_format=torch.channels_last)
        dgamma = torch.zeros(c)
        dbeta = torch.zeros(c)
        getattr(LIBRARY.load(), f"unsup3d_group_norm_nhwc_backward_{_SUFFIX[x.dtype]}")(
            dy.data_ptr(), x.data_ptr(), mean.data_ptr(), rstd.data_ptr(), gamma.data_ptr(), n, h * w, c,
            ctx.groups, dx.data_ptr(), dgamma.data_ptr(), dbeta.data_ptr())
        weight_dtype, bias_dtype = ctx.parameter_dtypes
        return dx, None, dgamma.to(weight_dtype), dbeta.to(bias_dtype), None


# Opaque to torch.compile: traced, the raw data pointers handed to C could be those of the tensors
# seen while tracing (native_zbuffer.zbuffer has the same guard).
@torch.compiler.disable
def group_norm_nhwc(x: torch.Tensor, groups: int, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """F.group_norm(x, groups, weight, bias, eps) for a channels-last CPU x, by the C loops."""
    return _GroupNormNHWC.apply(x, groups, weight, bias, eps)


class GroupNormNHWC(nn.GroupNorm):
    """nn.GroupNorm whose channels-last CPU inputs go to the C loops (module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if supports(x, self) and LIBRARY.load() is not None:
            return group_norm_nhwc(x, self.num_groups, self.weight, self.bias, self.eps)
        return super().forward(x)
