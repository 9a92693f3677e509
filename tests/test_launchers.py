"""`unsup3d train` under the two standard launchers, torchrun and the deepspeed launcher, with 2
processes on gloo: same checkpoint layout, and the same weights either way."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(kind: str, config: Path) -> list[str]:
    port = str(free_port())
    if kind == "torchrun":
        return [str(BIN / "torchrun"), "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", port,
                "-m", "cluster.cli", "train", "--config", str(config)]
    return [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_addr", "127.0.0.1", "--master_port", port,
            "--module", "cluster.cli", "train", "--config", str(config)]


@pytest.fixture(scope="module")
def runs(synthetic_root, tmp_path_factory):
    root = tmp_path_factory.mktemp("launchers")
    out = {}
    for kind in ("torchrun", "deepspeed"):
        config = root / f"{kind}.yaml"
        config.write_text(yaml.safe_dump({
            "model": {"depth_nf": 8, "depth_zdim": 16, "albedo_nf": 8, "albedo_zdim": 16, "light_nf": 8,
                      "view_nf": 8, "conf_nf": 8, "conf_zdim": 16},
            "perceptual": {"backbone": "none"}, "loss": {"lam_perc": 0.0},
            "data": {"root": str(synthetic_root), "batch_size": 8},
            "train": {"out_dir": str(root / kind), "max_steps": 3, "checkpoint_every": 100},
            "monitoring": {"enabled": False},
        }))
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = subprocess.run(launch(kind, config), env=env, capture_output=True, text=True, timeout=600,
                              cwd=Path(__file__).resolve().parents[1])
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        out[kind] = root / kind / "checkpoints" / "step_00000003"
    return out


@pytest.mark.parametrize("kind", ["torchrun", "deepspeed"])
def test_two_processes_checkpoint_every_rank(runs, kind):
    state = torch.load(runs[kind] / "state.pt", weights_only=True)
    assert state["world_size"] == 2 and sorted(state["ranks"]) == ["0", "1"]
    assert state["step"] == 3


def test_both_launchers_train_the_same_weights(runs):
    a = torch.load(runs["torchrun"] / "model.pt", weights_only=True)["model"]
    b = torch.load(runs["deepspeed"] / "model.pt", weights_only=True)["model"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
