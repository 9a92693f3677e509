"""Ray Train's torch setup, with nothing listening beyond loopback on a local cluster (issue 15, item 6).

Ray Train's TorchConfig makes every run's workers create a torch process group through a TCPStore
that the rank-0 worker hosts. torch binds that store to every interface (in6addr_any), whatever
MASTER_ADDR says, so even an embedded Ray on 127.0.0.1 had a port open to the network. The backend
below changes two cases and leaves the rest to Ray Train:

- One worker: there is nobody to meet. It sets the launch variables (RANK, WORLD_SIZE, LOCAL_RANK, ...)
  as Ray Train does and creates no group; the trainer then makes its own group of one
  (trainer/loop/process_group.py: torch's in-process "fake" backend on CPU, no port).
- Several workers whose rank 0 is on a loopback address (an embedded Ray, or a local test cluster,
  whose nodes all run on 127.0.0.1): rank 0 opens the store's listening socket itself, bound to
  127.0.0.1, and hands it to torch (TCPStore's master_listen_fd), the others connect to it, and gloo's
  and NCCL's own sockets are kept on the loopback interface (GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME=lo,
  unless set). Opening the socket first also removes the race of picking a free port and binding it
  later.

A real cluster (rank 0 on a routable address) keeps Ray Train's setup unchanged.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import ray
from ray.train.torch import TorchConfig
from ray.train._internal.worker_group import WorkerGroup as V1WorkerGroup
from ray.train.torch.config import _set_torch_distributed_env_vars, _TorchBackend

_LISTENER: list = []  # rank 0's store socket: owned by this worker process for the life of its group


def _node_address() -> str:
    return ray.util.get_node_ip_address()


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def _open_store_listener() -> int:
    """On rank 0: a listening socket on 127.0.0.1 for the rendezvous store; returns its port."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    _LISTENER[:] = [listener]
    return listener.getsockname()[1]


def _loopback_environment(port: int) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # gloo's pair sockets: else the host name's address
    os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")  # NCCL's bootstrap: else the first non-loopback one


def _join_loopback_group(backend: str, world_rank: int, world_size: int, port: int, timeout_s: float) -> None:
    import torch.distributed as dist

    timeout = timedelta(seconds=timeout_s)
    if world_rank == 0:
        store = dist.TCPStore("127.0.0.1", port, world_size, is_master=True, timeout=timeout,
                              wait_for_workers=False, master_listen_fd=_LISTENER[0].fileno())
    else:
        store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False, timeout=timeout)
    dist.init_process_group(backend, store=store, rank=world_rank, world_size=world_size, timeout=timeout)


class _LocalFirstBackend(_TorchBackend):
    def on_start(self, worker_group, backend_config) -> None:
        workers = len(worker_group)
        v2 = not isinstance(worker_group, V1WorkerGroup)  # Ray Train v1 sets the variables in on_training_start
        if workers == 1:
            if v2:
                worker_group.execute(_set_torch_distributed_env_vars)  # no MASTER_ADDR/PORT: nothing to meet at
            return
        if not _is_loopback(worker_group.execute_single(0, _node_address)):
            super().on_start(worker_group, backend_config)
            return
        port = worker_group.execute_single(0, _open_store_listener)
        if v2:
            worker_group.execute(_set_torch_distributed_env_vars)
        worker_group.execute(_loopback_environment, port=port)
        ray.get([worker_group.execute_single_async(rank, _join_loopback_group, backend=backend_config.backend,
                                                   world_rank=rank, world_size=workers, port=port,
                                                   timeout_s=backend_config.timeout_s)
                 for rank in range(workers)])


@dataclass
class LocalFirstTorchConfig(TorchConfig):
    """TorchConfig whose runs open no port beyond loopback on a local cluster (see the module's text)."""

    @property
    def backend_cls(self):
        return _LocalFirstBackend


def torch_config(use_gpu: bool) -> TorchConfig:
    return LocalFirstTorchConfig(backend="nccl" if use_gpu else "gloo")


__all__ = ["LocalFirstTorchConfig", "torch_config"]
