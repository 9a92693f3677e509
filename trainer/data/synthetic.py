"""Synthetic, probably-symmetric objects with ground-truth depth, written in the synface layout.

The project's stand-in for the BFM "synface" set (SPEC 6), which cannot be downloaded here. Each
object is a face-like relief: a superellipse "mask" cut out of a dome that rises from a plane, with
a nose ridge, eye sockets, a brow, cheeks, a mouth and a chin, all mirror-symmetric about the
vertical centre line, plus a little asymmetric detail (random bumps and dents in depth, blemishes in
albedo). Albedo, light and view are sampled inside the model's own parameterisation (SPEC 2) and
the object is rendered with the project's renderer (SPEC 3), so the ground-truth depth is the depth
the model itself would render in the input view.

Why the shape is built this way:
- The model represents a canonical depth map over the whole frame. The object is therefore a
  height field over a plane; the surface continues past the object's mask boundary (into the dome
  and then the plane), so rotating the mesh makes no "walls" at the silhouette. Only the pixels
  whose canonical source lies inside the mask are object pixels; all other pixels get the
  background colour in the image and byte 0 in the depth PNG, like a face mesh rendered alone.
- The relief's nearest point is near min_depth (0.9) and its rim about 0.05 to 0.15 behind it: a
  face filling much of a 10-degree field of view is about 0.12 wide at depth 1, so that relief is
  roughly head-like in proportion (nose tip to the side of the face).
- Object points stay within about 0.1 of the rotation centre (0, 0, 1) at the default sizes, so
  rotated depths stay inside [0.9, 1.1]; the little that falls outside (a few pixels in a
  thousand images) is clamped so that object pixels always encode to bytes 1..255 and the
  background is exactly 0.

Everything is rendered at `render_scale` times the output size and average-pooled (anti-aliasing).
Randomness comes from one torch.Generator per sample, seeded from (seed, split, index), so a data
set is deterministic for a seed and the first k samples of a split do not depend on how many are
written; the batch size does not change the bytes written either (a test checks it on this CPU
build; other BLAS builds or devices may differ in the last bit, hence rarely by one byte).

Modules: synthetic_params.py draws the parameters, synthetic_render.py renders them, this module
writes the data set in the synface layout.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from trainer.data.synface import write_sample
from trainer.data.synthetic_params import _SPLIT_STREAMS, SPLITS, SyntheticConfig, dataset_params
from trainer.data.synthetic_render import _render


# ----------------------------------------------------------------------------------------------
# Writing the synface layout
# ----------------------------------------------------------------------------------------------


def _to_uint8_image(image: torch.Tensor) -> np.ndarray:
    """[3,H,W] in [-1,1] -> uint8 [H,W,3]."""
    return ((image.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()


def sample_name(index: int) -> str:
    return f"{index:06d}"


def generate_synface(root: str, cfg: SyntheticConfig, splits=SPLITS) -> dict[str, int]:
    """Write cfg.num_<split> images per split under root in the synface layout; return the counts.

    Deterministic for cfg (in particular cfg.seed): image i of a split always comes from the same
    per-image generator, whatever the batch size or the number of images asked for. Existing files
    of the same names are overwritten; other files in root are left alone.
    """
    for split in splits:
        if split not in _SPLIT_STREAMS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    previous_threads = torch.get_num_threads()
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
    try:
        return _generate(root, cfg, splits)
    finally:
        torch.set_num_threads(previous_threads)


def _generate(root: str, cfg: SyntheticConfig, splits) -> dict[str, int]:
    counts: dict[str, int] = {}
    for split in splits:
        n = cfg.count(split)
        os.makedirs(os.path.join(root, split, "image"), exist_ok=True)
        os.makedirs(os.path.join(root, split, "depth"), exist_ok=True)
        for start in range(0, n, cfg.batch_size):
            idx = range(start, min(n, start + cfg.batch_size))
            p = dataset_params(cfg, split, idx)
            out = _render(p, cfg)
            depth = out["depth"].double().numpy()
            for j, i in enumerate(idx):
                write_sample(root, split, sample_name(i), _to_uint8_image(out["image"][j]), depth[j])
        counts[split] = n
    return counts


def main_generate(root: str, image_size: int, num_train: int, num_val: int, num_test: int, seed: int,
                  background: str = "noise", albedo_hues: str = "any") -> dict[str, int]:
    """CLI entry: generate a synthetic synface-layout data set under root with default distributions."""
    cfg = SyntheticConfig(image_size=image_size, num_train=num_train, num_val=num_val, num_test=num_test, seed=seed,
                          background=background, albedo_hues=albedo_hues)
    return generate_synface(root, cfg)
