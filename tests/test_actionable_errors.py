"""Errors a user can act on (issue 15, item 4): a full disk during a save, the exporter's file_sd entry
on a full disk, a checkpoint whose weights do not fit its config, a checkpoint file that holds code.

A full disk cannot be made here (no tmpfs of our own), so the writes are made to fail the way they do on
a full disk: torch's zip writer raises RuntimeError("... unexpected pos ...") with little space left,
plain writes raise OSError(ENOSPC)."""

from __future__ import annotations

import errno
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from cluster.cli import main as cli_main
from test_resume_config import fast_config
from trainer.config import dump_config

DISK_FULL_TORCH = "[enforce fail at inline_container.cc:672] . unexpected pos 4736 vs 4624"


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("unsup3d ")]
    assert len(errors) == 1 and "Traceback" not in "\n".join(err), err
    return errors[0]


def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_previous_checkpoint(synthetic_root, tmp_path, capsys,
                                                                                 monkeypatch):
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    config = fast_config(synthetic_root, tmp_path / "run", max_steps=2, keep_checkpoints=1)
    path = tmp_path / "run.yaml"
    path.write_text(dump_config(config))
    assert cli_main(["train", "--no-ray", "--config", str(path)]) == 0
    checkpoints = tmp_path / "run" / "checkpoints"
    before = {p.name: p.stat().st_size for p in (checkpoints / "step_00000002").rglob("*")}

    # 1. DeepSpeed's own file: a partial write, then torch's disk-full error; the disk reports little room.
    def short_write(self, state_dict, path):
        Path(path).write_bytes(b"PK\x03\x04 partial")
        raise RuntimeError(DISK_FULL_TORCH)

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(TorchCheckpointEngine, "save", short_write)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=4096))
    assert cli_main(["train", "--no-ray", "--config", str(path), "--max-steps", "4"]) == 2
    line = one_error_line(capsys)
    assert f"no space left on {checkpoints}" in line and "step_00000002 is intact" in line, line
    monkeypatch.undo()

    # 2. Our own file (model.pt): OSError(ENOSPC).
    real_save = torch.save

    def full_disk_save(obj, f, *args, **kwargs):
        if isinstance(f, (str, Path)) and Path(f).name == "model.pt":
            Path(f).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk_save)
    assert cli_main(["train", "--no-ray", "--config", str(path), "--max-steps", "4"]) == 2
    assert f"no space left on {checkpoints}" in one_error_line(capsys)
    monkeypatch.undo()

    # The previous checkpoint is untouched, `latest` names it, and nothing temporary is left.
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step_00000002"]
    assert (checkpoints / "latest").read_text() == "step_00000002"
    assert {p.name: p.stat().st_size for p in (checkpoints / "step_00000002").rglob("*")} == before
    assert not list((tmp_path / "run").rglob("*.tmp")) and not (tmp_path / "run" / ".run.lock").exists()
    # and the same command, with room again, goes on from it
    assert cli_main(["train", "--no-ray", "--config", str(path), "--max-steps", "3"]) == 0
    assert (checkpoints / "latest").read_text() == "step_00000003"
    capsys.readouterr()


def test_the_exporter_survives_a_full_disk_without_leaving_a_partial_file(tmp_path, monkeypatch, caplog):
    from prometheus_client import CollectorRegistry

    from monitoring.exporter import MetricsExporter

    real_write_text = Path.write_text

    def full_disk(self, data, *args, **kwargs):
        if self.suffix == ".tmp":
            real_write_text(self, data[:5], *args, **kwargs)
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real_write_text(self, data, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full_disk)
    exporter = MetricsExporter(CollectorRegistry(), sd_dir=tmp_path / "sd", labels={"run": "r"}).start()
    try:
        assert exporter.sd_file is None and exporter.port > 0
        assert "no space left on device" in caplog.text and "still served" in caplog.text
        assert list((tmp_path / "sd").iterdir()) == []
    finally:
        exporter.close()


def small_weights_with_other_config(tmp_path: Path) -> Path:
    """A single-file checkpoint whose weights are of one model config and whose stored config is another."""
    from trainer.config import RunConfig
    from trainer.model.config import ModelConfig
    from trainer.model.unsup3d import Unsup3D

    small = dict(depth_nf=8, albedo_nf=8, conf_nf=8, depth_zdim=16, albedo_zdim=16, conf_zdim=16, light_nf=8, view_nf=8)
    weights = Unsup3D(ModelConfig(**small)).state_dict()
    config = RunConfig()
    config.model = ModelConfig(**{**small, "depth_nf": 16})
    path = tmp_path / "mismatched.pt"
    torch.save({"model": weights, "config_yaml": dump_config(config), "step": 3}, path)
    return path


@pytest.mark.parametrize("command", ["evaluate", "demo"])
def test_a_checkpoint_whose_weights_do_not_fit_is_one_line(command, synthetic_root, tmp_path, capsys):
    checkpoint = small_weights_with_other_config(tmp_path)
    args = (["--data", str(synthetic_root)] if command == "evaluate"
            else ["--input", str(synthetic_root / "test" / "image" / "000000_image.png"), "--out", str(tmp_path / "d")])
    assert cli_main([command, "--checkpoint", str(checkpoint), *args]) == 2
    line = one_error_line(capsys)
    assert "weights do not fit the model its config describes" in line and str(checkpoint) in line, line
    assert "in the checkpoint" in line and "more" in line, line


class Payload:
    def __reduce__(self):
        return (print, ("this would run on load",))


@pytest.mark.parametrize("command", ["evaluate", "demo"])
def test_a_checkpoint_holding_code_is_refused_in_one_line_without_a_way_around(command, synthetic_root, tmp_path,
                                                                                capsys):
    checkpoint = tmp_path / "evil.pt"
    checkpoint.write_bytes(pickle.dumps({"model": Payload(), "config_yaml": "model: {}\n"}))
    args = (["--data", str(synthetic_root)] if command == "evaluate"
            else ["--input", str(synthetic_root / "test" / "image" / "000000_image.png"), "--out", str(tmp_path / "d")])
    assert cli_main([command, "--checkpoint", str(checkpoint), *args]) == 2
    captured = capsys.readouterr()
    assert "this would run on load" not in captured.out + captured.err
    line = captured.err.strip()
    assert "\n" not in line and str(checkpoint) in line and "code" in line and "will not be loaded" in line, line
    assert "weights_only" not in line, line
