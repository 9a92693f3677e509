"""Unsup3D: the five nets, the photo-geometric autoencoding through the renderer, and the loss.

The nets may run under autocast; everything from their outputs on (output mappings, renderer,
losses) runs in float32, because depth differences of 1e-3 matter to the rasterizer and normals.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from trainer.model.config import LossConfig, ModelConfig
from trainer.model.losses import perceptual_loss, photometric_loss, smoothness_loss
from trainer.model.nets import ConfidenceNet, Encoder, EncoderDecoder
from trainer.model.perceptual import PerceptualNet
from trainer.render.geometry import view_to_rotation_translation
from trainer.render.renderer import Renderer, RendererConfig
from trainer.loop.timing import NO_TIMER, SectionTimer


def float_maps(maps: torch.Tensor) -> torch.Tensor:
    """A net's output maps as float32 in the default (NCHW) layout, in one copy. With
    engine.channels_last the nets write channels-last maps, on which the renderer's and losses' CPU
    ops are slower."""
    return maps.to(torch.float32, memory_format=torch.contiguous_format)


def map_range(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Map [-1, 1] to [low, high]."""
    return (1 + x) / 2 * high + (1 - x) / 2 * low


def convex_depth_prior(size: int, amplitude: float) -> torch.Tensor:
    """[H, W] raw-depth offset: a paraboloid bump, nearer (negative) in the centre (ModelConfig.depth_prior)."""
    y, x = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    return -amplitude * (1 - (x / 0.75) ** 2 - (y / 0.9) ** 2).clamp(min=0)


@dataclass
class Decomposition:
    """What the model infers from a batch of B images (canonical maps and the input-view renders).

    Tensors with a leading 2B hold the original branch first and the flipped branch second.
    """

    canon_depth_raw: torch.Tensor  # [B, H, W] before the border overwrite (for the smoothness term)
    canon_depth: torch.Tensor  # [2B, H, W]
    canon_albedo: torch.Tensor  # [2B, 3, H, W]
    canon_normal: torch.Tensor  # [2B, H, W, 3]
    canon_shading: torch.Tensor  # [2B, 1, H, W]
    canon_image: torch.Tensor  # [2B, 3, H, W]
    light: torch.Tensor  # [B, 4] raw light-net output
    view: torch.Tensor  # [B, 6] raw view-net output
    view_depth: torch.Tensor  # [2B, H, W] depth rendered in the input view
    recon_image: torch.Tensor  # [2B, 3, H, W]
    recon_mask: torch.Tensor  # [2B, 1, H, W] product of both branches' masks, detached
    sigma_photometric: torch.Tensor | None  # [2B, 1, H, W]
    sigma_perceptual: torch.Tensor | None  # [2B, 1, H/4, W/4]
    view_mirrored: torch.Tensor | None = None  # [B, 6] view net on the mirrored images (loss.lam_pose_flip)
    light_mirrored: torch.Tensor | None = None  # [B, 4] light net on the mirrored images


# How the view and light of a mirror image relate to the original's (SPEC 2 parameterisation):
# pitch, ty, tz and the light's ambient, diffuse and y stay; yaw, roll, tx and the light's x change sign.
MIRROR_VIEW_SIGNS = (1.0, -1.0, -1.0, -1.0, 1.0, 1.0)
MIRROR_LIGHT_SIGNS = (1.0, 1.0, -1.0, 1.0)


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of maps [B, H, W] (replicated borders), kernel radius ceil(2 sigma)."""
    radius = max(1, math.ceil(2 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=maps.dtype, device=maps.device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    # Weighted sums of shifted slices rather than F.conv2d: a 1-channel convolution is the slowest
    # case of oneDNN on CPU (its backward cost 10% of a small-width training step; issue 14).
    height, width = maps.shape[-2:]
    out = F.pad(maps[:, None], (radius, radius, radius, radius), mode="replicate")[:, 0]
    taps = kernel.tolist()
    out = sum(tap * out[:, :, k : k + width] for k, tap in enumerate(taps))
    return sum(tap * out[:, k : k + height, :] for k, tap in enumerate(taps))


def scale_initial_weights(layer: nn.Module, scale: float) -> None:
    """Multiply a freshly initialised layer's weights (ModelConfig.depth_init_scale, view_init_scale)."""
    with torch.no_grad():
        layer.weight.mul_(scale)


class Unsup3D(nn.Module):
    """The five independent nets (SPEC 2) with the renderer in between (SPEC 3)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        size = config.image_size
        self.depth_net = EncoderDecoder(1, config.depth_nf, config.depth_zdim, size)
        scale_initial_weights(self.depth_net.decoder[-1], config.depth_init_scale)
        # persistent=False: follows from the config, so checkpoints stay plain net weights
        self.register_buffer("depth_prior", convex_depth_prior(size, config.depth_prior), persistent=False)
        self.albedo_net = EncoderDecoder(3, config.albedo_nf, config.albedo_zdim, size, activation=nn.Tanh())
        self.light_net = Encoder(4, config.light_nf, size)
        self.view_net = Encoder(6, config.view_nf, size)
        scale_initial_weights(self.view_net.network[-2], config.view_init_scale)
        self.confidence_net = ConfidenceNet(config.conf_nf, config.conf_zdim, size) if config.use_confidence else None
        # Training with loss.lam_pose_flip > 0 sets this: decompose then also runs the view and light
        # nets on the mirrored images. Not part of the model's function, so not in its config.
        self.mirrored_pose = False
        self.renderer = Renderer(
            RendererConfig(
                image_size=size,
                min_depth=config.min_depth,
                max_depth=config.max_depth,
                supersample=config.supersample,
                pixel_centre=config.pixel_centre,
            )
        )

    def canonical_depth(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw depth-net output [B, H, W] -> canonical depth in [min, max] (SPEC 2), before the border overwrite."""
        if self.config.depth_blur > 0:
            raw = gaussian_blur(raw, self.config.depth_blur)
        raw = raw + self.depth_prior.to(raw.dtype)
        raw = raw - raw.mean(dim=(1, 2), keepdim=True)
        return map_range(torch.tanh(raw), self.config.min_depth, self.config.max_depth)

    def with_border(self, depth: torch.Tensor) -> torch.Tensor:
        border = self.config.resolved_border_depth
        columns = torch.zeros(depth.shape[-1], dtype=torch.bool, device=depth.device)
        columns[:2] = True
        columns[-2:] = True
        return torch.where(columns, torch.full_like(depth, border), depth)

    def view_transform(self, view: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        return view_to_rotation_translation(
            view, max_angle_degrees=cfg.max_rotation_degrees, xy_range=cfg.xy_translation, z_range=cfg.z_translation
        )

    def decompose(self, image: torch.Tensor, timer: SectionTimer = NO_TIMER) -> Decomposition:
        """Infer depth, albedo, light and view from images [B, 3, H, W] in [-1, 1] and render both branches."""
        with timer("nets_forward"):
            depth_raw = float_maps(self.depth_net(image))[:, 0]
            albedo = float_maps(self.albedo_net(image))
            sigmas = self.confidence_net(image) if self.confidence_net is not None else None
            view_mirrored = light_mirrored = None
            if self.mirrored_pose:
                # The images and their mirror images in one batch: the encoders work per image, and
                # one call of twice the batch is cheaper than two calls (issue 14).
                both = torch.cat([image, image.flip(-1)])
                light, light_mirrored = self.light_net(both).float().chunk(2)
                view, view_mirrored = self.view_net(both).float().chunk(2)
            else:
                light = self.light_net(image).float()
                view = self.view_net(image).float()

        with timer("render"), torch.autocast(device_type=image.device.type, enabled=False):
            canon_depth_raw = self.canonical_depth(depth_raw)
            depth = self.with_border(canon_depth_raw)
            canon_depth = torch.cat([depth, depth.flip(-1)])
            canon_albedo = torch.cat([albedo, albedo.flip(-1)])

            k_ambient = map_range(light[:, 0], 0.0, 1.0).repeat(2)
            k_diffuse = map_range(light[:, 1], 0.0, 1.0).repeat(2)
            direction = torch.cat([light[:, 2:4], torch.ones_like(light[:, :1])], dim=1)
            direction = (direction / direction.norm(dim=1, keepdim=True)).repeat(2, 1)

            canon_normal = self.renderer.normals(canon_depth, eps=self.config.shading_normal_eps)
            canon_image, canon_shading = self.renderer.shade(canon_albedo, canon_normal, k_ambient, k_diffuse, direction)

            rotation, translation = self.view_transform(view)
            rotation, translation = rotation.repeat(2, 1, 1), translation.repeat(2, 1)
            view_depth = self.renderer.render_depth(canon_depth, rotation, translation)
            recon_image = self.renderer.warp_canonical(canon_image, view_depth, rotation, translation)

            batch = image.shape[0]
            mask = self.renderer.recon_mask(view_depth)
            mask_both = (mask[:batch] * mask[batch:]).detach().unsqueeze(1).repeat(2, 1, 1, 1)
            recon_image = recon_image * mask_both

            sigma_photometric = sigma_perceptual = None
            if sigmas is not None:
                photometric, perceptual = (float_maps(s) for s in sigmas)
                # channel 0 weights the original branch, channel 1 the flipped one
                sigma_photometric = torch.cat([photometric[:, 0:1], photometric[:, 1:2]])
                sigma_perceptual = torch.cat([perceptual[:, 0:1], perceptual[:, 1:2]])

        return Decomposition(
            canon_depth_raw=canon_depth_raw,
            canon_depth=canon_depth,
            canon_albedo=canon_albedo,
            canon_normal=canon_normal,
            canon_shading=canon_shading,
            canon_image=canon_image,
            light=light,
            view=view,
            view_depth=view_depth,
            recon_image=recon_image,
            recon_mask=mask_both,
            sigma_photometric=sigma_photometric,
            sigma_perceptual=sigma_perceptual,
            view_mirrored=view_mirrored,
            light_mirrored=light_mirrored,
        )


def mirrored_pose_loss(out: Decomposition) -> torch.Tensor:
    """Mean |v(mirror I) - M v(I)| + |l(mirror I) - M l(I)| over the raw view and light outputs: the mirror
    image of a face turned by +yaw is the mirrored face turned by -yaw, lit from the mirrored side."""
    view_signs = out.view.new_tensor(MIRROR_VIEW_SIGNS)
    light_signs = out.light.new_tensor(MIRROR_LIGHT_SIGNS)
    return ((out.view_mirrored - view_signs * out.view).abs().mean()
            + (out.light_mirrored - light_signs * out.light).abs().mean())


class Unsup3DLoss(nn.Module):
    """L = L_photo + lam_flip L_photo_flip + lam_perc (L_perc + lam_flip L_perc_flip) + lam_smooth L_smooth."""

    def __init__(self, config: LossConfig, perceptual_net: PerceptualNet | None, model_config: ModelConfig):
        super().__init__()
        self.config = config
        self.perceptual_net = perceptual_net
        self.min_depth, self.max_depth = model_config.min_depth, model_config.max_depth

    def forward(self, image: torch.Tensor, out: Decomposition, epoch: int = 0,
                timer: SectionTimer = NO_TIMER) -> dict[str, torch.Tensor]:
        cfg = self.config
        batch = image.shape[0]
        target = image.float()
        mask = out.recon_mask
        sig_l1 = out.sigma_photometric
        terms: dict[str, torch.Tensor] = {}
        with torch.autocast(device_type=image.device.type, enabled=False):
            for name, part in (("photometric", slice(0, batch)), ("photometric_flip", slice(batch, 2 * batch))):
                terms[name] = photometric_loss(
                    out.recon_image[part], target, None if sig_l1 is None else sig_l1[part], mask[part]
                )
            lam_flip = cfg.lam_flip_at(epoch)
            total = terms["photometric"] + lam_flip * terms["photometric_flip"]
            if self.perceptual_net is not None and cfg.lam_perc > 0:
                with timer("perceptual_forward"):
                    features_target = self.perceptual_net(target)
                    features_recon = self.perceptual_net(out.recon_image)
                sig_perc = out.sigma_perceptual
                for name, part in (("perceptual", slice(0, batch)), ("perceptual_flip", slice(batch, 2 * batch))):
                    terms[name] = perceptual_loss(
                        features_recon[part], features_target, None if sig_perc is None else sig_perc[part], mask[part]
                    )
                total = total + cfg.lam_perc * (terms["perceptual"] + lam_flip * terms["perceptual_flip"])
            if cfg.lam_smooth > 0:
                terms["smooth"] = smoothness_loss(out.canon_depth_raw, self.min_depth, self.max_depth)
                total = total + cfg.lam_smooth * terms["smooth"]
            if cfg.lam_pose_flip > 0 and out.view_mirrored is not None:
                terms["pose_flip"] = mirrored_pose_loss(out)
                total = total + cfg.lam_pose_flip * terms["pose_flip"]
        terms["total"] = total
        return terms
