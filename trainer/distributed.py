"""The process group the trainer runs on: whatever a launcher (torchrun, the DeepSpeed launcher,
Ray Train) set up, or a single local process when nothing did.

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
        return ProcessGroup(rank, world, _env_int("LOCAL_RANK", 0), dist.get_backend(), created_here=False)

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
        # A world of one needs no rendezvous: an in-memory store binds no port.
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, **kwargs)
    else:
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world, **kwargs)
    log.info("process group: rank %d of %d (local rank %d), backend %s", rank, world, local_rank, backend)
    return ProcessGroup(rank, world, local_rank, backend, created_here=True)


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
