"""Shared fixtures: a small synthetic data set in the synface layout, generated once per session."""

from __future__ import annotations

import pytest
import torch

# Two cores on CI: more threads than cores only adds contention.
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    from trainer.synthetic import main_generate

    root = tmp_path_factory.mktemp("synthetic")
    main_generate(str(root), image_size=64, num_train=96, num_val=8, num_test=24, seed=0)
    return root
