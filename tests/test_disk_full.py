"""A real full disk (issue 15, item 4): `unsup3d train` on a 40 MB tmpfs, mounted in a private mount
namespace (`unshare -m`, so it vanishes with the process; needs root, skipped otherwise). test_actionable_errors
fakes the failing writes; this fills a filesystem.

Drills: a save that runs out of room, the same command again while still full, a start with almost no
room (config.yaml cannot be written), and the same command with room again. Each failure is one line
naming the path, exit status 2, no traceback; the previous checkpoint, `latest` and nothing else stay
(no temporary file, no file_sd entry of the dead run); with room, the run goes on from it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from cluster_helpers import TINY_MODEL

REPO = Path(__file__).resolve().parents[1]

DRILL = textwrap.dedent('''
    import json, os, shutil, subprocess, sys
    mount, config, results = sys.argv[1:4]
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", mount], check=True)

    def listing():
        run = os.path.join(mount, "run")
        return sorted(os.path.relpath(os.path.join(d, f), run) for d, _, files in os.walk(run) for f in files
                      if os.path.basename(d) != "logs")  # the console's library log, kept on purpose

    def fill(leave):
        with open(os.path.join(mount, "filler"), "ab") as f:
            f.write(bytes(max(0, shutil.disk_usage(mount).free - leave)))

    def train(*extra):
        done = subprocess.run([sys.executable, "-m", "cluster.cli", "train", "--no-ray", "--config", config, *extra],
                              capture_output=True, text=True)
        return {"rc": done.returncode, "stderr": done.stderr, "files": listing(),
                "latest": open(os.path.join(mount, "run", "checkpoints", "latest")).read()}

    phases = {"first": train()}
    fill(3_000_000)  # room for a few steps' records, not for a checkpoint (about 11 MB)
    phases["save"] = train("--max-steps", "4")
    phases["again"] = train("--max-steps", "4")
    fill(8192)
    phases["start"] = train("--max-steps", "4")
    os.remove(os.path.join(mount, "filler"))
    phases["room"] = train("--max-steps", "3")
    with open(results, "w") as f:
        json.dump(phases, f)
''')


def namespace_mounts_work() -> bool:
    if shutil.which("unshare") is None or os.geteuid() != 0:
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"],
                           capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not namespace_mounts_work(), reason="needs root to mount a tmpfs in a private mount namespace")
def test_a_really_full_disk_is_one_line_keeps_the_previous_checkpoint_and_leaves_nothing_behind(synthetic_root,
                                                                                                 tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "model": TINY_MODEL, "perceptual": {"backbone": "none"}, "loss": {"lam_perc": 0.0},
        "data": {"root": str(synthetic_root), "batch_size": 8},
        "train": {"out_dir": str(mount / "run"), "max_steps": 2, "log_every": 1, "checkpoint_every": 1,
                  "keep_checkpoints": 1, "device": "cpu"}}))
    script = tmp_path / "drill.py"
    script.write_text(DRILL)
    results = tmp_path / "results.json"
    subprocess.run(["unshare", "-m", sys.executable, str(script), str(mount), str(config), str(results)],
                   cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}, check=True,
                   timeout=900)
    phases = json.loads(results.read_text())

    step_2 = ["checkpoints/latest", "checkpoints/step_00000002/ds/mp_rank_00_model_states.pt",
              "checkpoints/step_00000002/model.pt", "checkpoints/step_00000002/state.pt", "config.yaml",
              "metrics.jsonl"]
    assert phases["first"]["rc"] == 0, phases["first"]["stderr"][-3000:]
    assert phases["first"]["files"] == step_2
    for name in ("save", "again", "start"):
        phase = phases[name]
        errors = [line for line in phase["stderr"].splitlines() if line.startswith("unsup3d train: error:")]
        assert phase["rc"] == 2 and len(errors) == 1 and "Traceback" not in phase["stderr"], phase["stderr"][-3000:]
        assert phase["files"] == step_2, f"{name}: {phase['files']}"  # no .tmp, no file_sd entry of the dead run
        assert phase["latest"] == "step_00000002"
        if name == "start":
            assert f"no space left on {mount / 'run' / 'config.yaml'}" in errors[0], errors[0]
        else:
            assert f"no space left on {mount / 'run' / 'checkpoints'}: checkpoint step_00000003 was not saved; the " \
                   "previous checkpoint step_00000002 is intact" in errors[0], errors[0]
    assert phases["room"]["rc"] == 0, phases["room"]["stderr"][-3000:]
    assert phases["room"]["latest"] == "step_00000003"
