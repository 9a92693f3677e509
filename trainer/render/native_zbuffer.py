"""The rasteriser's z-buffer compiled from C (zbuffer.c) and called through ctypes, on CPU float32.

The PyTorch fast path (rasterizer._fast_zbuffer) runs some 500 elementwise ops per call, each a
pass over a few hundred thousand (face, pixel) candidates: on CPU it was a seventh of a small-width
training step (issue 14). The C loop does the same arithmetic in one pass, with the same result
bit for bit (tests/test_native_zbuffer.py), a dozen times faster.

It needs a C compiler at run time (`$CC`, else Python's configured compiler, else `cc`); no PyTorch
headers, so compiling takes well under a second. The library is built once per source version into
the cache folder (`$UNSUP3D_CACHE`, else `$XDG_CACHE_HOME/unsup3d`, else `~/.cache/unsup3d`), by an
atomic rename, so concurrent workers never load a half-written file. Where no compiler works, one
warning is logged and the rasteriser uses the PyTorch path: slower, same results.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import sysconfig
import tempfile
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("zbuffer.c")
# No fused multiply-adds (they would round differently from PyTorch's separate mul and sub), no
# fast-math, no -march=native (the cache may be shared by machines of different CPUs).
CFLAGS = ("-O2", "-shared", "-fPIC", "-ffp-contract=off", "-fno-fast-math", "-std=c99")

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_tried = False


def cache_folder() -> Path:
    """Where compiled libraries are kept (module docstring)."""
    if os.environ.get("UNSUP3D_CACHE"):
        return Path(os.environ["UNSUP3D_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "unsup3d"


def compiler() -> list[str] | None:
    """The C compiler command, or None where there is none."""
    configured = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    command = shlex.split(configured)
    if command and shutil.which(command[0]):
        return command
    return shutil.which("cc") and ["cc"]


def library_path(command: list[str]) -> Path:
    """The cached library's path: named by the source, flags, compiler and platform it was built from."""
    digest = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(CFLAGS).encode(), " ".join(command).encode(),
                 platform.machine().encode(), platform.system().encode()):
        digest.update(part + b"\0")
    return cache_folder() / f"zbuffer-{digest.hexdigest()[:16]}.so"


def build(command: list[str], target: Path) -> None:
    """Compile zbuffer.c into target (atomically); raises RuntimeError with the compiler's message."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(prefix=target.stem + ".", suffix=".partial.so", dir=target.parent)
    os.close(fd)
    try:
        result = subprocess.run([*command, *CFLAGS, str(SOURCE), "-o", partial],
                                capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed on {SOURCE}: {result.stderr.strip()[-2000:]}")
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)


def load() -> ctypes.CDLL | None:
    """The compiled z-buffer, building it on first use; None (after one warning) where that fails."""
    global _library, _tried
    with _lock:
        if _tried:
            return _library
        _tried = True
        command = compiler()
        if command is None:
            log.warning("rasterizer: no C compiler found (set CC); using the slower PyTorch z-buffer")
            return None
        try:
            target = library_path(command)
            if not target.exists():
                build(command, target)
            library = ctypes.CDLL(str(target))
        except (OSError, RuntimeError, subprocess.SubprocessError) as error:
            log.warning("rasterizer: could not build or load the C z-buffer (%s); using the slower PyTorch z-buffer",
                        error)
            return None
        function = library.unsup3d_zbuffer_f32
        function.restype = ctypes.c_int64
        function.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                             ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
        _library = library
        return _library


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
