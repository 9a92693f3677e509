"""C sources of the trainer compiled on first use and loaded with ctypes (the z-buffer, the channels-last GroupNorm).

They need a C compiler at run time (`$CC`, else Python's configured compiler, else `cc`); no PyTorch
headers, so compiling takes about a second. Each library is built once per source version into the
cache folder (`$UNSUP3D_CACHE`, else `$XDG_CACHE_HOME/unsup3d`, else `~/.cache/unsup3d`), by an
atomic rename, so concurrent workers never load a half-written file. Where no compiler works, one
warning is logged and the caller takes its PyTorch path: slower, same results.
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
from typing import Callable

# No fused multiply-adds (they would round differently from PyTorch's separate mul and sub), no
# fast-math, no -march=native (the cache may be shared by machines of different CPUs).
CFLAGS = ("-O2", "-shared", "-fPIC", "-ffp-contract=off", "-fno-fast-math", "-std=c99")


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


class NativeLibrary:
    """One C source: built on first use, loaded once per process, or None after one warning.

    declare: sets the ctypes signatures of the loaded library's functions. fallback: what the caller
    does without it, for the warning ("the slower PyTorch z-buffer").
    """

    def __init__(self, source: Path, declare: Callable[[ctypes.CDLL], None], fallback: str, log: logging.Logger):
        self.source = source
        self.declare = declare
        self.fallback = fallback
        self.log = log
        self._lock = threading.Lock()
        self._library: ctypes.CDLL | None = None
        self._tried = False

    def library_path(self, command: list[str]) -> Path:
        """The cached library's path: named by the source, flags, compiler and platform it was built from."""
        digest = hashlib.sha256()
        for part in (self.source.read_bytes(), " ".join(CFLAGS).encode(), " ".join(command).encode(),
                     platform.machine().encode(), platform.system().encode()):
            digest.update(part + b"\0")
        return cache_folder() / f"{self.source.stem}-{digest.hexdigest()[:16]}.so"

    def build(self, command: list[str], target: Path) -> None:
        """Compile the source into target (atomically); raises RuntimeError with the compiler's message."""
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, partial = tempfile.mkstemp(prefix=target.stem + ".", suffix=".partial.so", dir=target.parent)
        os.close(fd)
        try:
            result = subprocess.run([*command, *CFLAGS, str(self.source), "-o", partial, "-lm"],
                                    capture_output=True, text=True, timeout=120)
            if result.returncode != 0:
                raise RuntimeError(f"{' '.join(command)} failed on {self.source}: {result.stderr.strip()[-2000:]}")
            os.replace(partial, target)
        finally:
            if os.path.exists(partial):
                os.unlink(partial)

    def load(self, find_compiler: Callable[[], list[str] | None] | None = None) -> ctypes.CDLL | None:
        """The compiled library, building it on first use; None (after one warning) where that fails.
        find_compiler: defaults to this module's compiler(), looked up at the call."""
        if self._tried:  # the hot path (every GroupNorm call): no lock once settled
            return self._library
        with self._lock:
            if self._tried:
                return self._library
            try:
                self._library = self._build_and_load(find_compiler or compiler)
            finally:
                # Set last: the lock-free read above must never see _tried before _library.
                self._tried = True
            return self._library

    def _build_and_load(self, find_compiler: Callable[[], list[str] | None]) -> ctypes.CDLL | None:
        command = find_compiler()
        name = self.source.name
        if command is None:
            self.log.warning("%s: no C compiler found (set CC); using %s", name, self.fallback)
            return None
        try:
            target = self.library_path(command)
            if not target.exists():
                self.build(command, target)
            library = ctypes.CDLL(str(target))
            self.declare(library)
        except (OSError, RuntimeError, AttributeError, subprocess.SubprocessError) as error:
            self.log.warning("%s: could not build or load it (%s); using %s", name, error, self.fallback)
            return None
        return library
