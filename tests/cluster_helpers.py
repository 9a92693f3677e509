"""Helpers for the cluster tests: tiny run configs and a local multi-node Ray cluster on 127.0.0.1."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

TINY_MODEL = {"depth_nf": 8, "depth_zdim": 16, "albedo_nf": 8, "albedo_zdim": 16, "light_nf": 8, "view_nf": 8,
              "conf_nf": 8, "conf_zdim": 16}


def tiny_config(path: Path, data_root, out_dir, max_steps: int, checkpoint_every: int = 1000, **extra) -> Path:
    config = {"model": TINY_MODEL, "perceptual": {"backbone": "none"}, "loss": {"lam_perc": 0.0},
              "optimizer": {"lr": 1e-3}, "data": {"root": str(data_root), "batch_size": 8},
              "train": {"out_dir": str(out_dir), "max_steps": max_steps, "log_every": 1,
                        "checkpoint_every": checkpoint_every, "keep_checkpoints": 2, "device": "cpu"}}
    config.update(extra)
    path.write_text(yaml.safe_dump(config))
    return path


def start_local_cluster(nodes: int = 2, cpus_per_node: int = 1):
    """A Ray cluster of `nodes` raylets on 127.0.0.1, owned by the caller (cluster.shutdown() ends it)."""
    from cluster.ray_train import loopback_only

    loopback_only()
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": cpus_per_node, "include_dashboard": False,
                                                            "node_ip_address": "127.0.0.1"})
    for _ in range(nodes - 1):
        cluster.add_node(num_cpus=cpus_per_node, node_ip_address="127.0.0.1")
    cluster.wait_for_nodes()
    return cluster


def forget_launch_variables(monkeypatch) -> None:
    """Tests that trained in this process (trainer.loop.train.train) leave RANK, WORLD_SIZE, ... behind,
    and `unsup3d train` would take this process for a torchrun rank and skip Ray."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
