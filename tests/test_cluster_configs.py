"""The cluster launcher YAML and the KubeRay RayJob manifest, checked offline: the launcher config against
the schema that ships in the Ray wheel (what `ray up` validates first), the RayJob structurally. Both
must run the same entry point as `ray job submit`."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import yaml

from cluster.cli import build_parser

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_cluster_launcher_yaml_passes_rays_own_validation():
    pytest.importorskip("ray")
    from ray.autoscaler._private.util import validate_config

    config = yaml.safe_load((CONFIGS / "ray-cluster-gpu.yaml").read_text())
    validate_config(config)  # jsonschema against ray/autoscaler/ray-schema.json, then Ray's own checks
    assert config["available_node_types"][config["head_node_type"]]["resources"] == {"CPU": 0}
    assert any("unsup3d" in command for command in config["setup_commands"])


def test_kuberay_rayjob_runs_the_same_entry_point():
    manifest = yaml.safe_load((CONFIGS / "kuberay-rayjob.yaml").read_text())
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayJob"
    spec = manifest["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["unsup3d", "train"]
    args = build_parser().parse_args(argv[1:])  # the entry point parses with our CLI
    assert args.gpus_per_worker == 1 and args.workers == len(spec["rayClusterSpec"]["workerGroupSpecs"]) * \
        spec["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] // len(spec["rayClusterSpec"]["workerGroupSpecs"])
    assert (CONFIGS / Path(args.config).name).exists()
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == "2.60.0"
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["image"] and any(p["containerPort"] == 8265 for p in head["ports"])
    for group in cluster["workerGroupSpecs"]:
        container = group["template"]["spec"]["containers"][0]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    yaml.safe_load(spec["runtimeEnvYAML"])


def test_fleet_example_and_category_template_load():
    from cluster.fleet import load_fleet_config
    from cluster.job_config import load_job_config
    from cluster.new_category import render_category_config

    fleet = load_fleet_config(CONFIGS / "fleet-example.yaml")
    for member in fleet.members:
        load_job_config(CONFIGS / member.config)
    text = render_category_config("cats", "s3://bucket/cats", batch_size=64)
    assert "${" not in text and yaml.safe_load(text)["stream"]["shards"] == "s3://bucket/cats"
    json.dumps(yaml.safe_load(text))
