"""The five networks of Unsup3D (SPEC section 2): depth, albedo, light, view and confidence.

At 64 px they are exactly the reference's. Other image sizes (128, 256, ...) keep every layer of the
64 px design and add stride-2 stages where the feature maps are smallest (4x4 and below), so the
extra cost is in parameters rather than in activation FLOPs at high resolution.

No conv has a bias; GroupNorm always has 4 channels per group; LReLU slope 0.2.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from trainer.model.conv_forms import FewChannelConv2d, NearestUpsampledConv2d
from trainer.model.group_norm_nhwc import GroupNormNHWC


def group_norm(channels: int) -> nn.GroupNorm:
    # nn.GroupNorm's parameters and function; channels-last CPU maps go to C (group_norm_nhwc.py).
    return GroupNormNHWC(channels // 4, channels)


def extra_stages(image_size: int) -> int:
    """How many stride-2 stages an image of this size needs beyond the 64 px design."""
    log = math.log2(image_size)
    if image_size < 64 or log != int(log):
        raise ValueError(f"image_size must be a power of two >= 64, got {image_size}")
    return int(log) - 6


class Encoder(nn.Module):
    """Enc: a plain conv encoder to a vector of `cout` values in [-1, 1] (light and view nets)."""

    def __init__(self, cout: int, nf: int = 32, image_size: int = 64):
        super().__init__()
        layers: list[nn.Module] = []
        widths = [3, nf, 2 * nf, 4 * nf, 8 * nf] + [8 * nf] * extra_stages(image_size)
        for cin, cnext in zip(widths[:-1], widths[1:]):
            layers += [nn.Conv2d(cin, cnext, 4, 2, 1, bias=False), nn.ReLU(inplace=True)]
        layers += [
            nn.Conv2d(8 * nf, 8 * nf, 4, 1, 0, bias=False),
            nn.ReLU(inplace=True),
            nn.Conv2d(8 * nf, cout, 1, 1, 0, bias=False),
            nn.Tanh(),
        ]
        self.network = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x).flatten(1)


def encdec_encoder(nf: int, zdim: int, image_size: int) -> nn.Sequential:
    """The shared encoder design of EncDec and ConfNet: image -> zdim x 1 x 1."""
    layers: list[nn.Module] = []
    for cin, cout in [(3, nf), (nf, 2 * nf), (2 * nf, 4 * nf)]:
        layers += [nn.Conv2d(cin, cout, 4, 2, 1, bias=False), group_norm(cout), nn.LeakyReLU(0.2, inplace=True)]
    layers += [nn.Conv2d(4 * nf, 8 * nf, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, inplace=True)]
    for _ in range(extra_stages(image_size)):
        layers += [nn.Conv2d(8 * nf, 8 * nf, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, inplace=True)]
    layers += [nn.Conv2d(8 * nf, zdim, 4, 1, 0, bias=False), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


def up_block(cin: int, cout: int, refine: bool) -> list[nn.Module]:
    """convT4 s2 + GN + ReLU, optionally followed by conv3 + GN + ReLU at the new resolution."""
    layers: list[nn.Module] = [nn.ConvTranspose2d(cin, cout, 4, 2, 1, bias=False), group_norm(cout), nn.ReLU(inplace=True)]
    if refine:
        layers += [nn.Conv2d(cout, cout, 3, 1, 1, bias=False), group_norm(cout), nn.ReLU(inplace=True)]
    return layers


class EncoderDecoder(nn.Module):
    """EncDec: image -> per-pixel map with `cout` channels at the input resolution (depth and albedo)."""

    def __init__(self, cout: int, nf: int = 64, zdim: int = 256, image_size: int = 64, activation: nn.Module | None = None):
        super().__init__()
        self.encoder = encdec_encoder(nf, zdim, image_size)
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(zdim, 8 * nf, 4, 1, 0, bias=False),
            nn.ReLU(inplace=True),
            nn.Conv2d(8 * nf, 8 * nf, 3, 1, 1, bias=False),
            nn.ReLU(inplace=True),
        ]
        for _ in range(extra_stages(image_size)):
            layers += up_block(8 * nf, 8 * nf, refine=True)
        for cin, cnext in [(8 * nf, 4 * nf), (4 * nf, 2 * nf), (2 * nf, nf)]:
            layers += up_block(cin, cnext, refine=True)
        layers += [
            # The reference's nn.Upsample: the next layer upsamples itself (conv_forms.py); the
            # placeholder keeps every later layer's index, which checkpoints name them by.
            nn.Identity(),
            NearestUpsampledConv2d(nf, nf),
            group_norm(nf),
            nn.ReLU(inplace=True),
            nn.Conv2d(nf, nf, 5, 1, 2, bias=False),
            group_norm(nf),
            nn.ReLU(inplace=True),
            FewChannelConv2d(nf, cout, 5),
        ]
        if activation is not None:
            layers.append(activation)
        self.decoder = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


class ConfidenceNet(nn.Module):
    """ConfNet: per-pixel sigma maps for the photometric loss (2 x S x S: original and flipped branch)
    and for the perceptual loss (2 x S/4 x S/4), all positive (softplus)."""

    def __init__(self, nf: int = 64, zdim: int = 128, image_size: int = 64):
        super().__init__()
        self.encoder = encdec_encoder(nf, zdim, image_size)
        trunk: list[nn.Module] = [nn.ConvTranspose2d(zdim, 8 * nf, 4, 1, 0, bias=False), nn.ReLU(inplace=True)]
        for _ in range(extra_stages(image_size)):
            trunk += up_block(8 * nf, 8 * nf, refine=False)
        trunk += up_block(8 * nf, 4 * nf, refine=False) + up_block(4 * nf, 2 * nf, refine=False)
        self.trunk = nn.Sequential(*trunk)
        self.photometric_head = nn.Sequential(
            *up_block(2 * nf, nf, refine=False),
            *up_block(nf, nf, refine=False),
            FewChannelConv2d(nf, 2, 5),
            nn.Softplus(),
        )
        self.perceptual_head = nn.Sequential(nn.Conv2d(2 * nf, 2, 3, 1, 1, bias=False), nn.Softplus())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.trunk(self.encoder(x))
        return self.photometric_head(features), self.perceptual_head(features)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
