"""Realistic synthetic faces in the synface layout, rendered from MakeHuman's CC0 head model.

Each image is one person (identity sliders, ethnicity/gender/age macros, asymmetric targets), with an
expression (mostly symmetric, some not), skin-tone albedo with lips, brows, eyes and teeth, hair or
none, a pose (yaw, pitch, roll about the point the model rotates about), a Lambertian light inside
the model's light model, and a varied background. Images use the model's camera (fov 10 degrees,
pixel centres at integer coordinates); the ground-truth depth is rendered in the input view at the
pixel centres, as the synface reader and evaluate expect.

Beside the synface files, each split gets `truth.npz` with what the model is meant to recover: the
view and light in the model's own parameterisation (raw net outputs in [-1, 1], SPEC 2), the pose in
degrees, and the canonical (frontal) depth of each face, so diagnostics can correlate predictions
with the truth (see trainer/results/truth_probe.py).

Deterministic in the seed: image i of a split comes from its own random stream, whatever the batch
size or the number of images asked for.

Modules: face_sampling.py draws the people, face_render.py renders them, this module writes the
splits and their truth.npz.
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch

from trainer.data.face_render import render_faces
from trainer.data.face_sampling import FaceConfig, _rng, sample_face
from trainer.data.head_model import HeadModel, load_head_model
from trainer.data.synface import write_sample
from trainer.data.synthetic_params import SPLITS

TRUTH_FILE = "truth.npz"


# ---------------------------------------------------------------------------------------------
# Writing the synface layout


def generate_faces(root: str, cfg: FaceConfig, splits=SPLITS, progress=None) -> dict[str, int]:
    """Write cfg.num_<split> faces per split under root in the synface layout, plus <split>/truth.npz."""
    previous_threads = torch.get_num_threads()
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
    try:
        model = load_head_model()
        counts = {}
        for split in splits:
            if split not in SPLITS:
                raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
            counts[split] = _generate_split(root, split, model, cfg, progress)
        return counts
    finally:
        torch.set_num_threads(previous_threads)


def _generate_split(root: str, split: str, model: HeadModel, cfg: FaceConfig, progress) -> int:
    n = cfg.count(split)
    names, views, lights, poses, canon = [], [], [], [], []
    start_time = time.monotonic()
    for start in range(0, n, cfg.batch_size):
        idx = range(start, min(n, start + cfg.batch_size))
        params = [sample_face(model, cfg, _rng(cfg.seed, split, i)) for i in idx]
        out = render_faces(model, params, cfg)
        image = ((out["image"].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        depth = out["depth"].double().numpy()
        for j, i in enumerate(idx):
            name = f"{i:06d}"
            write_sample(root, split, name, image[j], depth[j])
            names.append(name)
        views.append(out["view"].numpy())
        lights.append(out["light"].numpy())
        poses.append(np.array([[q["yaw"], q["pitch"], q["roll"]] for q in params], np.float32))
        canon.append(out["canonical_depth"].numpy().astype(np.float16))
        if progress is not None:
            progress(split, min(n, start + cfg.batch_size), n, time.monotonic() - start_time)
    if n:
        path = os.path.join(root, split, TRUTH_FILE)
        tmp = path + f".tmp{os.getpid()}.npz"
        np.savez_compressed(tmp, names=np.array(names), view=np.concatenate(views), light=np.concatenate(lights),
                            pose_degrees=np.concatenate(poses), canonical_depth=np.concatenate(canon),
                            image_size=np.array(cfg.image_size))
        os.replace(tmp, path)
    return n


def read_truth(root, split: str) -> dict[str, np.ndarray] | None:
    """<root>/<split>/truth.npz as a dict (names, view [N,6], light [N,4], pose_degrees [N,3] as yaw,
    pitch, roll, canonical_depth [N,S,S]), or None when the folder has none."""
    path = os.path.join(root, split, TRUTH_FILE)
    if not os.path.isfile(path):
        return None
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}
