"""The one strict config loader (trainer/config_loading.py) is shared by trainer and data_pipeline without
breaking DESIGN's boundaries: reading data_pipeline's configs loads nothing of the model, DeepSpeed or Ray."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _modules_after(statement: str) -> set[str]:
    code = f"import json, sys\n{statement}\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    return set(json.loads(out.stdout))


def test_data_pipeline_configs_load_no_model_torch_deepspeed_or_ray():
    loaded = _modules_after("import data_pipeline.config, trainer.config_loading")
    assert "trainer.config_loading" in loaded and "data_pipeline.config" in loaded
    heavy = {m for m in loaded if m.split(".")[0] in ("torch", "deepspeed", "ray", "nvidia", "webdataset")}
    project = {m for m in loaded if m.split(".")[0] in ("trainer", "cluster", "monitoring")}
    assert heavy == set(), sorted(heavy)[:5]
    assert project == {"trainer", "trainer.config_loading"}, sorted(project)


def test_there_is_one_yaml_to_dataclass_converter():
    """No package keeps its own copy of the strict conversion (the data pipeline had one until issue 16)."""
    copies = [str(p.relative_to(ROOT)) for package in ("trainer", "data_pipeline", "cluster", "monitoring")
              for p in (ROOT / package).rglob("*.py")
              if "typing.get_type_hints" in p.read_text() and p.name != "config_loading.py"]
    assert copies == []
