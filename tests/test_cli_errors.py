"""Bad command-line input to evaluate, demo, prepare and generate is one line and exit status 2, never a
traceback (issue 15: "a clear one-line error for every bad config"; the run config's own table is
test_config_errors.py): an unknown device, a missing data folder or split, an output path that is a
file."""

from __future__ import annotations

import pytest

from cluster.cli import main as cli_main


@pytest.fixture
def places(tmp_path, synthetic_root):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    image = synthetic_root / "test" / "image" / "000000_image.png"
    return {"FILE": str(a_file), "DATA": str(synthetic_root), "IMAGE": str(image), "OUT": str(tmp_path / "out"),
            "FOLDER": str(synthetic_root / "test" / "image")}


CASES = [
    ("evaluate --device gpu --data DATA --no-report", "device 'gpu': not a device"),
    ("evaluate --device cuda:7 --data DATA --no-report", "device 'cuda:7'"),
    ("evaluate --data FILE/nowhere", "synface split folder not found"),
    ("evaluate --data DATA --split nosuch", "synface split folder not found"),
    ("demo --input IMAGE --out FILE", "FILE: File exists"),
    ("demo --input IMAGE --out OUT --device gpu", "device 'gpu': not a device"),
    ("prepare --source folder --input FOLDER --output FILE --category x", "FILE: File exists"),
    ("generate --kind blobs --out FILE --num-train 1 --num-val 0 --num-test 0", "FILE/train: Not a directory"),
]


@pytest.mark.parametrize("command, expected", CASES, ids=[c[0].split(" --")[0] + ":" + c[1][:24] for c in CASES])
def test_bad_command_line_input_is_one_line(places, capsys, command, expected):
    import torch

    if "cuda:7" in command and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a CUDA device 7")
    argv = command.split()
    argv = [next((arg.replace(k, v) for k, v in places.items() if arg.startswith(k)), arg) for arg in argv]
    for key, value in places.items():
        expected = expected.replace(key, value)
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith(f"unsup3d {argv[0]}: error:")]
    assert len(errors) == 1 and "Traceback" not in err, err[-2000:]
    assert expected in errors[0], errors[0]
