"""Shared fixtures: a small synthetic data set in the synface layout, generated once per session."""

from __future__ import annotations

import os

# Before torch loads OpenMP (and inherited by every command a test starts): threads that sleep while
# they wait. With libgomp's spinning waits, 2 threads on a shared 2-core machine trained 5x slower
# than 1 (BENCHMARKS.md, "Embedded Ray uses every core"); a 6-step in-process run took 204 s against
# 32 s with this, at load 31. `unsup3d` itself sets the same default (cluster/cli.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

# Two cores on CI: more threads than cores only adds contention.
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    from trainer.data.synthetic import main_generate

    root = tmp_path_factory.mktemp("synthetic")
    main_generate(str(root), image_size=64, num_train=96, num_val=8, num_test=24, seed=0)
    return root


@pytest.fixture(scope="session")
def tiny_trained_run(synthetic_root, tmp_path_factory):
    """One tiny 1-step run trained through `unsup3d train`, shared by the tests that only need a checkpoint."""
    from cluster.cli import main as cli_main
    from test_train import small_config
    from trainer.config import dump_config

    run = tmp_path_factory.mktemp("tiny_run")
    config = small_config(synthetic_root, run / "run", max_steps=1)
    path = run / "run.yaml"
    path.write_text(dump_config(config))
    assert cli_main(["train", "--config", str(path)]) == 0
    return run / "run"
