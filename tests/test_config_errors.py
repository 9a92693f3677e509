"""Every malformed run config ends `unsup3d train` with one line on stderr that names the file and the
key, and exit status 2, before anything is built (issue 15, item 2)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cluster.cli import main as cli_main

REPO = Path(__file__).resolve().parents[1]


def billion_laughs(levels: int = 9) -> str:
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels):
        lines.append(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def base(root: Path) -> dict:
    """A valid small config whose data folder exists."""
    return {"model": {"depth_nf": 8, "albedo_nf": 8, "conf_nf": 8, "depth_zdim": 16, "albedo_zdim": 16,
                      "conf_zdim": 16, "light_nf": 8, "view_nf": 8},
            "perceptual": {"backbone": "none"}, "loss": {"lam_perc": 0.0},
            "data": {"root": str(root), "batch_size": 4},
            "train": {"out_dir": str(root.parent / "run"), "max_steps": 1}}


def with_value(section: str, key: str, value):
    def change(config: dict) -> dict:
        config.setdefault(section, {})[key] = value
        return config
    return change


# (case id, how to make the file: a function of the valid config dict, or raw YAML text; what stderr names)
CASES = [
    ("negative-width", with_value("model", "depth_nf", -16), "model.depth_nf"),
    ("width-not-multiple-of-4", with_value("model", "conf_nf", 10), "model.conf_nf"),
    ("zero-batch", with_value("data", "batch_size", 0), "data.batch_size"),
    ("bool-batch", with_value("data", "batch_size", True), "data.batch_size"),
    ("zero-checkpoint-interval", with_value("train", "checkpoint_every", 0), "train.checkpoint_every"),
    ("zero-log-interval", with_value("train", "log_every", 0), "train.log_every"),
    ("negative-visualize-interval", with_value("train", "visualize_every", -1), "train.visualize_every"),
    ("negative-max-steps", with_value("train", "max_steps", -5), "train.max_steps"),
    ("zero-keep", with_value("train", "keep_checkpoints", 0), "train.keep_checkpoints"),
    ("bad-device", with_value("train", "device", "gpu"), "train.device"),
    ("probability-above-one", with_value("data", "hflip_probability", 7.0), "data.hflip_probability"),
    ("missing-data-root", with_value("data", "root", "/nonexistent/unsup3d-data"), "data.root"),
    ("unsupported-image-size", with_value("model", "image_size", 100), "model.image_size"),
    ("negative-lr", with_value("optimizer", "lr", -1), "optimizer.lr"),
    ("nan-lr", "optimizer:\n  lr: .nan\n", "optimizer.lr"),
    ("infinite-lr", "optimizer:\n  lr: .inf\n", "optimizer.lr"),
    ("beta-above-one", with_value("optimizer", "betas", [0.9, 1.5]), "optimizer.betas[1]"),
    ("negative-loss-weight", with_value("loss", "lam_smooth", -0.1), "loss.lam_smooth"),
    ("depth-range-inverted", with_value("model", "min_depth", 1.2), "model.min_depth"),
    ("zero-stage-3", with_value("engine", "zero_stage", 3), "engine.zero_stage"),
    ("port-out-of-range", with_value("monitoring", "port", 70000), "monitoring.port"),
    ("unknown-key", with_value("model", "imgae_size", 128), "model.imgae_size"),
    ("wrong-type", with_value("train", "max_steps", "lots"), "train.max_steps"),
    ("stream-probability", lambda c: {**c, "stream": {"shards": "s3://b/p", "batch_size": 4, "hflip_probability": 2.0}},
     "stream.hflip_probability"),
    ("stream-without-shards", lambda c: {**c, "stream": {"batch_size": 4}}, "stream.shards is required"),
    ("stream-batch-mismatch", lambda c: {**c, "stream": {"shards": "s3://b/p", "batch_size": 8}}, "stream.batch_size"),
    ("s3-out-dir-without-ray", with_value("train", "out_dir", "s3://unsup3d-runs/x"), "train.out_dir"),
    ("out-dir-is-a-file", with_value("train", "out_dir", "FILE"), "train.out_dir"),
    ("out-dir-under-a-file", with_value("train", "out_dir", "FILE/run"), "train.out_dir"),
    ("missing-eval-data", with_value("train", "eval_data", "/nonexistent/unsup3d-eval"), "train.eval_data"),
    ("unresolvable-bind-address", with_value("monitoring", "bind_address", "999.1.1.1"), "monitoring.bind_address"),
    ("multi-line-value", with_value("data", "split", "train\n" + "x" * 100_000), "data.split"),
    ("empty-file", "", "empty"),
    ("comments-only", "# nothing here\n", "empty"),
    ("top-level-list", "- 1\n- 2\n", "top level"),
    ("not-yaml", "model: [unclosed\n", "not valid YAML"),
    ("duplicate-key", "train:\n  max_steps: 1\ntrain:\n  max_steps: 2\n", "'train' appears twice"),
    ("alias-bomb", billion_laughs(), "alias"),
    ("recursive-alias", "category: &a [*a]\n", "recursive alias"),
]


def write_case(tmp_path: Path, make) -> Path:
    root = tmp_path / "data"
    (root / "train" / "image").mkdir(parents=True, exist_ok=True)
    path = tmp_path / "run.yaml"
    (tmp_path / "a-file").write_text("not a folder")
    text = make if isinstance(make, str) else yaml.safe_dump(make(base(root)))
    path.write_text(text.replace("FILE", str(tmp_path / "a-file")))
    return path


@pytest.mark.parametrize("make, key", [(m, k) for _, m, k in CASES], ids=[c[0] for c in CASES])
def test_malformed_config_is_one_line_naming_file_and_key(tmp_path, capsys, make, key):
    path = write_case(tmp_path, make)
    started = time.perf_counter()
    assert cli_main(["train", "--no-ray", "--config", str(path)]) == 2
    assert time.perf_counter() - started < 5  # refused before anything is built
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err[:2000]
    line = lines[0]
    assert line.startswith("unsup3d train: error: ") and key in line and str(path) in line, line
    assert len(line) < 600, line
    assert not (tmp_path / "run").exists()  # nothing written


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
def test_a_cuda_device_on_a_machine_without_one_is_one_line(tmp_path, capsys):
    path = write_case(tmp_path, with_value("train", "device", "cuda"))
    assert cli_main(["train", "--no-ray", "--config", str(path)]) == 2
    line = capsys.readouterr().err.strip()
    assert "\n" not in line and "train.device = 'cuda'" in line and "use auto or cpu" in line, line


def test_the_valid_base_config_passes_the_checks(tmp_path):
    from cluster.job_config import check_sources, load_job_config

    path = write_case(tmp_path, lambda config: config)
    check_sources(load_job_config(path), path)


def test_command_line_overrides_are_checked_like_the_file(tmp_path, capsys):
    path = write_case(tmp_path, lambda config: config)
    assert cli_main(["train", "--no-ray", "--config", str(path), "--max-steps", "-5"]) == 2
    line = capsys.readouterr().err.strip()
    assert "train.max_steps = -5" in line and str(path) in line and "\n" not in line


def test_the_real_command_refuses_an_alias_bomb_in_one_line(tmp_path):
    """Through a real process: stderr holds exactly one line (no log line, no traceback), exit status 2."""
    bomb = write_case(tmp_path, billion_laughs())
    result = subprocess.run([sys.executable, "-m", "cluster.cli", "train", "--no-ray", "--config", str(bomb)],
                            capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.count("\n") == 1 and "alias" in result.stderr and str(bomb) in result.stderr


def test_max_steps_zero_saves_the_initial_weights_and_trains_nothing(synthetic_root, tmp_path):
    """0 is allowed: a run of no step whose checkpoint (step 0) is the untrained model, e.g. a baseline for
    `unsup3d evaluate`. (Before, 0 fell through to train.epochs.)"""
    from test_resume_config import fast_config
    from trainer.loop.checkpoint_load import load_checkpoint
    from cluster.data_source import train

    result = train(fast_config(synthetic_root, tmp_path / "run", max_steps=0))
    assert result.steps == 0 and result.checkpoint.endswith("step_00000000")
    assert load_checkpoint(tmp_path / "run" / "checkpoints")["step"] == 0


def test_an_endless_config_file_is_refused_after_a_bounded_read(capsys):
    """/dev/zero reports a size of 0: the loader must not trust st_size and read until memory runs out."""
    started = time.perf_counter()
    assert cli_main(["train", "--no-ray", "--config", "/dev/zero"]) == 2
    assert time.perf_counter() - started < 5
    line = capsys.readouterr().err.strip()
    assert "\n" not in line and "/dev/zero: more than" in line, line
