"""`unsup3d train --workers auto` (issue 12 item 7, issue 14): on an embedded Ray, the global batch
(data.batch_size) split evenly over single-threaded workers, at most one per core, each keeping at
least 8 images; refused on a cluster, one worker in this process with --no-ray."""

from __future__ import annotations

import json
import os

import pytest
import yaml

from cluster.cli import main as cli_main


@pytest.mark.parametrize("batch, cores, expected", [
    (32, 2, 2),    # the default on a 2-core laptop: two workers of 16
    (32, 1, 1),
    (32, 3, 2),    # 3 does not divide 32
    (32, 16, 4),   # 8 images each at most 4 workers
    (48, 4, 4),
    (12, 2, 1),    # two workers of 6 would be below 8
    (8, 2, 1),
    (7, 8, 1),
])
def test_the_most_workers_that_split_the_batch_evenly_with_8_images_each(batch, cores, expected):
    from cluster.ray_train import auto_worker_count

    assert auto_worker_count(batch, cores) == expected


def test_auto_is_refused_on_a_cluster_and_a_bad_count_is_named(synthetic_root, tmp_path, capsys, monkeypatch):
    from cluster_helpers import forget_launch_variables, tiny_config

    forget_launch_variables(monkeypatch)
    path = tiny_config(tmp_path / "run.yaml", synthetic_root, tmp_path / "out", max_steps=2)
    assert cli_main(["train", "--config", str(path), "--workers", "auto", "--address", "127.0.0.1:1"]) == 2
    err = capsys.readouterr().err
    assert "--workers auto is for the embedded Ray" in err and "Traceback" not in err, err[-2000:]
    with pytest.raises(SystemExit):
        cli_main(["train", "--config", str(path), "--workers", "many"])
    assert "expected a number of workers or 'auto', got 'many'" in capsys.readouterr().err


def test_auto_with_no_ray_trains_the_whole_batch_in_this_process(synthetic_root, tmp_path, capsys, monkeypatch):
    from cluster_helpers import forget_launch_variables, tiny_config

    forget_launch_variables(monkeypatch)
    out = tmp_path / "out"
    path = tiny_config(tmp_path / "run.yaml", synthetic_root, out, max_steps=2, data={"root": str(synthetic_root),
                                                                                     "batch_size": 16})
    assert cli_main(["train", "--config", str(path), "--workers", "auto", "--no-ray"]) == 0
    capsys.readouterr()
    assert yaml.safe_load((out / "config.yaml").read_text())["data"]["batch_size"] == 16


def test_an_embedded_run_with_auto_workers_splits_the_global_batch(synthetic_root, tmp_path, capsys, monkeypatch):
    pytest.importorskip("ray")
    from cluster.ray_train import auto_worker_count
    from cluster_helpers import forget_launch_variables, tiny_config

    forget_launch_variables(monkeypatch)
    out = tmp_path / "out"
    path = tiny_config(tmp_path / "run.yaml", synthetic_root, out, max_steps=4, data={"root": str(synthetic_root),
                                                                                     "batch_size": 16})
    assert cli_main(["train", "--config", str(path), "--workers", "auto"]) == 0
    capsys.readouterr()
    expected = auto_worker_count(16, os.cpu_count())
    ranks = sorted(int(p.stem.split("_")[1]) for p in (out / "workers").glob("rank_*.json"))
    assert ranks == list(range(expected))
    assert yaml.safe_load((out / "config.yaml").read_text())["data"]["batch_size"] == 16 // expected
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(row.get("step", 0) for row in steps) == 4
