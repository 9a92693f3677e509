"""Helpers of the data pipeline tests: tiny generated datasets, a real moto S3 server on 127.0.0.1, and a
TCP forwarder standing for the S3 address across a server restart.

Everything is small (16-24 px images, a few dozen samples) so the whole suite runs in well under a
minute on two shared cores. Modules here have unique names (dp_helpers, test_dp_*) because this folder
has no __init__.py (it would shadow the data_pipeline package) and so shares pytest's flat module namespace.
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import struct
import subprocess
import threading
import sys
import time
import urllib.request
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from data_pipeline.config import PrepareConfig  # noqa: E402
from data_pipeline.prepare import prepare_dataset  # noqa: E402


def random_rgb(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A smooth-ish random colour image (JPEG-friendly, distinct per sample)."""
    base = rng.integers(0, 256, size=(3,), dtype=np.int64)
    yy, xx = np.mgrid[0:height, 0:width]
    image = np.stack([(base[c] + 7 * xx + 3 * (c + 1) * yy) % 256 for c in range(3)], -1)
    return (image + rng.integers(0, 8, size=image.shape)).clip(0, 255).astype(np.uint8)


def encode(array: np.ndarray, fmt: str = "PNG", mode: str | None = None, **kwargs) -> bytes:
    image = Image.fromarray(array)
    if mode is not None:
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def png16_rgb(array16: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG (PIL cannot write one)."""
    height, width, _ = array16.shape
    raw = b"".join(b"\x00" + array16[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def make_synface(root: Path, count: int, size: int = 16, split: str = "train", seed: int = 0) -> list[str]:
    """A synface-layout folder: <root>/<split>/image/<name>_image.png + depth/<name>_depth.png (RGB depth)."""
    rng = np.random.default_rng(seed)
    (root / split / "image").mkdir(parents=True, exist_ok=True)
    (root / split / "depth").mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(count):
        name = f"obj{i:04d}"
        Image.fromarray(random_rgb(rng, size, size)).save(root / split / "image" / f"{name}_image.png")
        depth = rng.integers(0, 256, size=(size, size), dtype=np.uint8)
        depth[:2] = 0  # background rows
        # Channel 0 is the depth; the other channels differ so that using them would show.
        Image.fromarray(np.stack([depth, 255 - depth, depth // 2], -1)).save(root / split / "depth" / f"{name}_depth.png")
        names.append(name)
    return names


def prepared_synface(tmp_path: Path, count: int = 23, per_shard: int = 4, size: int = 16, name: str = "shards",
                     seed: int = 0) -> Path:
    source = tmp_path / f"{name}-src"
    make_synface(source, count, size, seed=seed)
    out = tmp_path / name
    prepare_dataset(PrepareConfig(source="synface", input=str(source), output=str(out), category="synthetic",
                                  samples_per_shard=per_shard))
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MotoServer:
    """moto's standalone S3 server as a child process on 127.0.0.1, stopped by the test that started it."""

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.process: subprocess.Popen | None = None
        self.log = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> None:
        executable = Path(sys.executable).with_name("moto_server")
        command = [str(executable)] if executable.exists() else [shutil.which("moto_server") or "moto_server"]
        self.log = open(os.devnull, "wb")
        self.process = subprocess.Popen(command + ["-H", "127.0.0.1", "-p", str(self.port)],
                                        stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"moto_server exited with {self.process.returncode}")
            try:
                urllib.request.urlopen(self.endpoint + "/", timeout=1).read()
                return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"moto_server did not answer on {self.endpoint} within {timeout}s")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
            self.process = None
        if self.log is not None:
            self.log.close()
            self.log = None


class Forwarder:
    """A TCP forwarder on 127.0.0.1 standing for the S3 service's stable address.

    moto keeps its objects in memory, so a restarted moto starts empty. To restart the server mid-epoch
    and still have the data there, the test takes this address down, stops moto, starts a new moto
    elsewhere, fills it, then brings the address up pointing at the new server; the loader meanwhile sees
    refused and reset connections, as it would with a persistent server being restarted.
    """

    def __init__(self):
        self.port = free_port()
        self.target: int | None = None
        self._listener: socket.socket | None = None
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def up(self, target_port: int) -> None:
        self.target = target_port
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        thread = threading.Thread(target=self._accept, args=(listener,), daemon=True)
        thread.start()
        self._threads.append(thread)

    def down(self) -> None:
        """Stop listening and cut every open connection."""
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        with self._lock:
            for sock in list(self._sockets):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()
            self._sockets.clear()
        for thread in self._threads:
            thread.join(timeout=5)
        self._threads = []

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                backend = socket.create_connection(("127.0.0.1", self.target), timeout=5)
                backend.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets.update((client, backend))
            for source, sink in ((client, backend), (backend, client)):
                thread = threading.Thread(target=self._pump, args=(source, sink), daemon=True)
                thread.start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
