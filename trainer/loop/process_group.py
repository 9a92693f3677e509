"""The process group the trainer runs on: whatever a launcher (torchrun, the DeepSpeed launcher,
Ray Train) set up, or a single local process when nothing did (torch's in-process "fake" backend:
no port; see _init_world_of_one).

Launchers describe the group in RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. With
none of them set (a laptop, a test) this is a world of one on 127.0.0.1. DeepSpeed needs those
variables even when torch.distributed is already initialized, or it tries MPI discovery and fails
without mpi4py, so the defaults are written into the environment too. Backend: NCCL on CUDA, gloo
otherwise.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProcessGroup:
    rank: int
    world_size: int
    local_rank: int
    backend: str
    created_here: bool
    local_world_size: int = 1
    """Ranks on this machine (the launcher's LOCAL_WORLD_SIZE; 1 where it does not say)."""

    @property
    def on_one_machine(self) -> bool:
        """Every rank runs here: a world of one, an embedded Ray's workers, torchrun on one node."""
        return self.world_size == 1 or self.local_world_size == self.world_size

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value in (None, "") else int(value)


def init_process_group(device_type: str, timeout_s: float = 1800.0) -> ProcessGroup:
    """Join (or create) the default process group and return this process's place in it."""
    backend = "nccl" if device_type == "cuda" else "gloo"
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        for name, value in (("RANK", rank), ("WORLD_SIZE", world), ("LOCAL_RANK", _env_int("LOCAL_RANK", 0)),
                            ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", 0)):
            os.environ.setdefault(name, str(value))
        return ProcessGroup(rank, world, _env_int("LOCAL_RANK", 0), dist.get_backend(), created_here=False,
                            local_world_size=_env_int("LOCAL_WORLD_SIZE", 1))

    rank = _env_int("RANK", 0)
    world = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", rank if world > 1 else 0)
    if world > 1 and ("MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ):
        raise RuntimeError(f"WORLD_SIZE={world} but MASTER_ADDR/MASTER_PORT are not set: start the processes with "
                           "torchrun or the deepspeed launcher, or set them yourself")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(free_port())
    for name, value in (("RANK", rank), ("WORLD_SIZE", world), ("LOCAL_RANK", local_rank)):
        os.environ[name] = str(value)
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    kwargs = {"timeout": timedelta(seconds=timeout_s)}
    if world == 1:
        backend = _init_world_of_one(backend, kwargs)
    else:
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world, **kwargs)
    log.info("process group: rank %d of %d (local rank %d), backend %s", rank, world, local_rank, backend)
    return ProcessGroup(rank, world, local_rank, backend, created_here=True,
                        local_world_size=_env_int("LOCAL_WORLD_SIZE", 1))


def _init_world_of_one(backend: str, kwargs: dict) -> str:
    """A process group of one process that opens no port.

    A world of one needs no rendezvous (an in-memory HashStore), but gloo and NCCL still open a TCP
    listener for every group (DeepSpeed adds groups of its own), on a machine where nothing should
    listen. torch's "fake" backend communicates with nobody, and for one rank that is exact: its
    collectives copy each input to the outputs (all-gather, reduce-scatter) or leave it as it is
    (all-reduce, broadcast), which is what a group of one computes. Older torch versions whose fake
    collectives leave outputs untouched fail the check below, and then gloo (or NCCL) is used.

    UNSUP3D_WORLD_OF_ONE_BACKEND: "auto" (default) uses it on CPU and keeps NCCL on CUDA (DeepSpeed on a
    GPU with this backend has not been run: no GPU where this was written); "local" uses it on CUDA too;
    "real" never.
    """
    choice = os.environ.get("UNSUP3D_WORLD_OF_ONE_BACKEND", "auto")
    wanted = choice == "local" or (choice == "auto" and backend == "gloo")
    if wanted and _register_fake_backend():
        dist.init_process_group("fake", store=dist.HashStore(), rank=0, world_size=1, **kwargs)
        if _exact_for_one_rank():
            log.debug("world of one: torch's in-process 'fake' backend (no port); collectives are exact for one rank")
            return "fake"
        log.warning("this torch's in-process backend does not copy collective results: using %s, which opens a "
                    "port on 127.0.0.1", backend)
        dist.destroy_process_group()
    if backend == "nccl":
        # NCCL's bootstrap listens on the first non-loopback interface it finds, for peers a world of one
        # does not have. Read when the first communicator is made, so setting it now is in time.
        # (Not yet run on a GPU.)
        os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, **kwargs)
    return backend


def _register_fake_backend() -> bool:
    """torch registers the creator of its "fake" backend in this module (torch >= 2.1); False without it."""
    try:
        import torch.testing._internal.distributed.fake_pg  # noqa: F401
    except Exception:  # noqa: BLE001 - absent or changed in this torch version: use the real backend
        return False
    return True


def _exact_for_one_rank() -> bool:
    """The collectives DeepSpeed uses give the one-rank results."""
    import warnings

    x = torch.arange(4, dtype=torch.float32)
    gathered, scattered, listed, reduced = torch.zeros(4), torch.zeros(4), [torch.zeros(4)], x.clone()
    with warnings.catch_warnings():  # newer torch renames two of these; the check is about results only
        warnings.simplefilter("ignore")
        dist.all_gather_into_tensor(gathered, x)
        dist.reduce_scatter_tensor(scattered, x)
        dist.all_gather(listed, x)
        dist.all_reduce(reduced)
    return all(torch.equal(t, x) for t in (gathered, scattered, listed[0], reduced))


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_gather_object(obj) -> list:
    """Every rank's `obj`, in rank order (a list of one without a group of several)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s `obj` on every rank (`obj` itself without a group of several)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when `flag` is true on any (one tiny all-reduce)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    tensor = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item() > 0)
