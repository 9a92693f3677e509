"""The rasteriser's z-buffer compiled from C (zbuffer.c) and called through ctypes, on CPU float32.

The PyTorch fast path (rasterizer._fast_zbuffer) runs some 500 elementwise ops per call, each a
pass over a few hundred thousand (face, pixel) candidates: on CPU it was a seventh of a small-width
training step (issue 14). The C loop does the same arithmetic in one pass, with the same result
bit for bit (tests/test_native_zbuffer.py), a dozen times faster.

Built on first use into the cache folder by trainer/native_library.py (it needs a C compiler at run
time). Where no compiler works, one warning is logged and the rasteriser uses the PyTorch path:
slower, same results.
"""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path

import torch

from trainer import native_library
from trainer.native_library import NativeLibrary

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("zbuffer.c")


def _declare(library: ctypes.CDLL) -> None:
    function = library.unsup3d_zbuffer_f32
    function.restype = ctypes.c_int64
    function.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                         ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]


LIBRARY = NativeLibrary(SOURCE, _declare, "the slower PyTorch z-buffer", log)


def compiler() -> list[str] | None:
    """The C compiler command, or None where there is none (native_library.compiler)."""
    return native_library.compiler()


def library_path(command: list[str]) -> Path:
    """The cached library's path for this compiler command."""
    return LIBRARY.library_path(command)


def build(command: list[str], target: Path) -> None:
    """Compile zbuffer.c into target (atomically); raises RuntimeError with the compiler's message."""
    LIBRARY.build(command, target)


def load() -> ctypes.CDLL | None:
    """The compiled z-buffer, building it on first use; None (after one warning) where that fails."""
    return LIBRARY.load(compiler)


def available() -> bool:
    """Whether the compiled z-buffer can be used in this process."""
    return load() is not None


def supports(screen: torch.Tensor) -> bool:
    """Whether zbuffer() handles these screen vertices: float32 on CPU."""
    return screen.device.type == "cpu" and screen.dtype == torch.float32


# Opaque to torch.compile: traced, the raw data pointers handed to C could be those of the tensors
# seen while tracing rather than of the call's own (a compiled renderer then corrupted the heap).
@torch.compiler.disable
def zbuffer(screen: torch.Tensor, faces: torch.Tensor, batch: int, height: int, width: int) -> torch.Tensor:
    """face_index [B, H, W] (long, -1 on the background) of screen vertices [3, B*N] and faces [F, 3].

    The same result as rasterizer._fast_zbuffer on the same input. Call available() first.
    """
    library = load()
    if library is None:
        raise RuntimeError("the C z-buffer is not available (see the warning logged on first use)")
    if not supports(screen):
        raise ValueError(f"the C z-buffer takes float32 CPU vertices, got {screen.dtype} on {screen.device}")
    if screen.dim() != 2 or screen.shape[0] != 3 or screen.shape[1] % batch or faces.dim() != 2 or faces.shape[1] != 3:
        raise ValueError(f"the C z-buffer takes screen [3, B*N] and faces [F, 3], got {tuple(screen.shape)} and "
                         f"{tuple(faces.shape)} for B = {batch}")
    screen = screen.detach().contiguous()
    faces = faces.to(device="cpu", dtype=torch.int64).contiguous()
    per_image = screen.shape[1] // batch
    keys = torch.empty(batch * height * width, dtype=torch.int64)
    face_index = torch.empty(batch, height, width, dtype=torch.int64)
    status = library.unsup3d_zbuffer_f32(screen.data_ptr(), batch, per_image, faces.data_ptr(), faces.shape[0],
                                         height, width, keys.data_ptr(), face_index.data_ptr())
    if status != 0:
        raise ValueError(f"rasterize_depth: a face refers to a vertex outside 0..{per_image - 1}")
    return face_index
