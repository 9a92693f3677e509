"""Real face photos that ship inside installed packages, cropped the way the generated faces are framed
(chin to above the brows, the head about three quarters of the width): scikit-image's astronaut
(Eileen Collins, NASA, public domain) and matplotlib's grace_hopper.jpg (US Navy, public domain).

Used by the shipped model's tests and to draw the README's panels: `unsup3d demo` takes the folder
that write_sample_photos fills.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

# (left, top, right, bottom) in the original photo.
CROPS = {
    "astronaut": (130, 18, 320, 208),
    "grace_hopper": (128, 86, 398, 356),
}


def _original(name: str) -> Image.Image:
    if name == "astronaut":
        from skimage import data

        return Image.fromarray(data.astronaut())
    if name == "grace_hopper":
        from matplotlib import cbook

        with Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)) as img:
            return img.convert("RGB")
    raise KeyError(f"unknown sample photo {name!r}; expected one of {sorted(CROPS)}")


def sample_photo(name: str, size: int = 64) -> Image.Image:
    """The face crop of a sample photo, resized to size x size (Lanczos)."""
    return _original(name).crop(CROPS[name]).resize((size, size), Image.LANCZOS)


def write_sample_photos(folder: str | Path, size: int = 128) -> list[Path]:
    """Write every sample face crop as <folder>/<name>.png; returns the paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in CROPS:
        path = folder / f"{name}.png"
        sample_photo(name, size).save(path)
        paths.append(path)
    return paths
