"""Ray Train's torch setup, less the rendezvous a run of one worker does not need (issue 15, item 6).

Ray Train's TorchConfig makes every run's workers create a torch process group through a TCPStore
that the rank-0 worker hosts. torch binds that store to every interface (in6addr_any), whatever
MASTER_ADDR says, so even an embedded Ray on 127.0.0.1 training with one worker had a port open to
the network. With one worker there is nobody to meet: the backend below sets the launch variables
(RANK, WORLD_SIZE, LOCAL_RANK, ...) as Ray Train does and creates no group, and the trainer then makes
its own group of one (trainer/loop/process_group.py: torch's in-process "fake" backend on CPU, no
port). Two or more workers keep Ray Train's own setup (and its TCPStore: see the README's "What
listens").
"""

from __future__ import annotations

from dataclasses import dataclass

from ray.train.torch import TorchConfig
from ray.train.torch.config import _set_torch_distributed_env_vars, _TorchBackend


class _WorldOfOneBackend(_TorchBackend):
    def on_start(self, worker_group, backend_config) -> None:
        if len(worker_group) > 1:
            super().on_start(worker_group, backend_config)
            return
        worker_group.execute(_set_torch_distributed_env_vars)  # no MASTER_ADDR/PORT: nothing to meet at


@dataclass
class LocalFirstTorchConfig(TorchConfig):
    """TorchConfig whose runs of one worker open no rendezvous port."""

    @property
    def backend_cls(self):
        return _WorldOfOneBackend


def torch_config(use_gpu: bool) -> TorchConfig:
    return LocalFirstTorchConfig(backend="nccl" if use_gpu else "gloo")


__all__ = ["LocalFirstTorchConfig", "torch_config"]
