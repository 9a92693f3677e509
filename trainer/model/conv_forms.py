"""Two convolutions of the decoders computed in forms that oneDNN runs faster on CPU (issue 14).

Same function, same parameters (the layers stay nn.Conv2d with the reference's weight shapes, so
state_dicts and checkpoints do not change), results equal up to float rounding:

- NearestUpsampledConv2d: nearest 2x upsampling followed by a 3x3 convolution (padding 1) is one
  stride-2 transposed convolution of the small input with a 4x4 kernel whose taps are sums of the
  3x3 taps. Output pixel 2m of a row sees input pixels m-1, m, m (taps w0, w1, w2), pixel 2m+1 sees
  m, m, m+1; so along each axis the 4 taps of the transposed kernel are (w2, w1+w2, w0+w1, w0).
  It skips the upsampled map and does 4/9 of the multiply-adds; the upsampling's backward alone
  cost as much as the convolution on CPU.
- FewChannelConv2d: a stride-1 convolution with 1 to 3 output channels (the depth, albedo and
  confidence heads) is one stride-r convolution with cout * r * r output channels, each the output
  at one offset of an r x r block (its kernel the original shifted by that offset inside a
  (k + r - 1)^2 window), followed by pixel_shuffle. oneDNN blocks output channels by 16: with 1 to
  3 of them it ran at a few GFLOP/s, and the r * r times wider form does more multiply-adds
  ((k + r - 1)^2 / k^2) at a much higher rate.

Both forms are used on CPU only. On other devices the layers run the reference's form (cuDNN has
no such blind spot, and the forms are unmeasured there).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def nearest_upsample_conv3x3(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """conv2d(interpolate(x, scale_factor=2, mode="nearest"), weight, padding=1), for weight [cout, cin, 3, 3]."""
    w = weight
    # Along rows, then along columns: taps (w2, w1 + w2, w0 + w1, w0). Plain additions, so that the
    # sums stay in the weight's dtype under autocast (the convolution then casts the result once).
    w = torch.stack([w[:, :, 2], w[:, :, 1] + w[:, :, 2], w[:, :, 0] + w[:, :, 1], w[:, :, 0]], dim=2)
    w = torch.stack([w[..., 2], w[..., 1] + w[..., 2], w[..., 0] + w[..., 1], w[..., 0]], dim=3)
    return F.conv_transpose2d(x, w.transpose(0, 1), stride=2, padding=1)


def block_factor(out_channels: int) -> int:
    """r of FewChannelConv2d: 4 for one output channel, 2 for two or three (fastest here, BENCHMARKS.md)."""
    return 4 if out_channels == 1 else 2


def few_channel_conv(x: torch.Tensor, weight: torch.Tensor, factor: int) -> torch.Tensor:
    """conv2d(x, weight, padding=k // 2) for an odd k and H, W divisible by factor, as a stride-factor
    convolution with cout * factor^2 outputs and pixel_shuffle."""
    cout, cin, k, _ = weight.shape
    r = factor
    window = k + r - 1
    # Output channel c * r * r + a * r + b holds output pixel (r i + a, r j + b): pixel_shuffle's order.
    shifted = [F.pad(weight, (b, window - k - b, a, window - k - a)) for a in range(r) for b in range(r)]
    block_weight = torch.stack(shifted, dim=1).reshape(cout * r * r, cin, window, window)
    # The block at (r i, r j) reads input rows r i - k // 2 .. r i + r - 1 + k // 2: the window, with
    # the same k // 2 of zero padding on every side as the original ('same') convolution. (conv2d's
    # own padding, not F.pad: a padded copy is copied once more in the backward pass, and the five
    # nets' step ran 3 to 5% slower with it; BENCHMARKS.md, "The nets alone against the target".)
    y = F.conv2d(x, block_weight, stride=r, padding=k // 2)
    return F.pixel_shuffle(y, r)


class NearestUpsampledConv2d(nn.Conv2d):
    """Nearest 2x upsampling, then this 3x3 convolution (padding 1, no bias): the input is the small map."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, 3, 1, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu":
            return nearest_upsample_conv3x3(x, self.weight)
        return super().forward(F.interpolate(x, scale_factor=2, mode="nearest"))


class FewChannelConv2d(nn.Conv2d):
    """A stride-1, odd-kernel, 'same'-padded convolution without bias, for 1 to 3 output channels."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int):
        if kernel_size % 2 != 1:
            raise ValueError(f"FewChannelConv2d needs an odd kernel_size, got {kernel_size}")
        super().__init__(in_channels, out_channels, kernel_size, 1, kernel_size // 2, bias=False)
        self.factor = block_factor(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.factor
        if x.device.type == "cpu" and x.shape[-2] % r == 0 and x.shape[-1] % r == 0:
            return few_channel_conv(x, self.weight, r)
        return super().forward(x)
