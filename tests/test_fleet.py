"""`unsup3d fleet`: two CPU categories train concurrently on one (embedded, loopback) Ray; a third, broken
category fails on its own without stopping them; `fleet status` shows state, step, loss and checkpoint."""

from __future__ import annotations

import json
import os

import pytest
import yaml

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # before Ray is imported: local nodes on 127.0.0.1 only
pytest.importorskip("ray")

from cluster.cli import main as cli_main  # noqa: E402
from cluster_helpers import tiny_config  # noqa: E402


def test_fleet_trains_two_categories_and_survives_a_failing_one(synthetic_root, tmp_path, capsys):
    state_dir = tmp_path / "fleet"
    tiny_config(tmp_path / "cats.yaml", synthetic_root, tmp_path / "unused", max_steps=3)
    tiny_config(tmp_path / "cars.yaml", synthetic_root, tmp_path / "unused", max_steps=3)
    tiny_config(tmp_path / "broken.yaml", tmp_path / "no-such-data", tmp_path / "unused", max_steps=3)
    fleet = {"name": "t", "state_dir": str(state_dir), "members": [
        {"category": "cats", "config": "cats.yaml", "workers": 1, "cpus_per_worker": 1, "max_failures": 0},
        {"category": "cars", "config": "cars.yaml", "workers": 1, "cpus_per_worker": 1, "max_failures": 0,
         "max_steps": 2},
        {"category": "broken", "config": "broken.yaml", "workers": 1, "cpus_per_worker": 1, "max_failures": 0},
    ]}
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump(fleet))

    assert cli_main(["fleet", "--config", str(path)]) == 1  # not every member succeeded
    states = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert states == {"cats": "succeeded", "cars": "succeeded", "broken": "failed"}

    assert cli_main(["fleet", "status", "--config", str(path), "--json"]) == 0
    rows = {row["category"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows["cats"]["step"] == 3 and rows["cars"]["step"] == 2
    for name in ("cats", "cars"):
        assert rows[name]["state"] == "succeeded" and rows[name]["loss"] > 0
        assert rows[name]["checkpoint"].startswith(str(state_dir / name / "checkpoints"))
        # the category is the run's label: it is in the resolved config saved next to its outputs
        assert yaml.safe_load((state_dir / name / "config.yaml").read_text())["category"] == name
    assert rows["broken"]["state"] == "failed" and rows["broken"]["checkpoint"] is None
    assert "no-such-data" in rows["broken"]["error"] or "No such file" in rows["broken"]["error"]

    assert cli_main(["fleet", "status", "--config", str(path)]) == 0
    table = capsys.readouterr().out
    assert "cats" in table and "succeeded" in table and "failed" in table
