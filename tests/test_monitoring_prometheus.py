"""Against a real Prometheus (Debian's package, started here on 127.0.0.1 and stopped by its handle):
a short training run is scraped through its file_sd entry; every PromQL expression of the dashboard
and the alert rules is valid and returns data where its condition holds (a second process pushes
unhealthy values through the metrics API); promtool accepts the rules and the config; the dashboard
has the structure Grafana imports."""

from __future__ import annotations

import json
import logging
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from test_train import small_config

ROOT = Path(__file__).resolve().parents[1]
MONITORING = ROOT / "monitoring"
DASHBOARD = MONITORING / "dashboards" / "unsup3d-training.json"
ALERTS = MONITORING / "alerts.yml"
needs_prometheus = pytest.mark.skipif(shutil.which("prometheus") is None or shutil.which("promtool") is None,
                                      reason="Debian's prometheus package is not installed (apt-get install prometheus)")

# A worker gone bad: stalled, non-finite steps, skipped samples, starved, restarted, old checkpoint, on
# a GPU. Two ranks in one process also show that workers sharing a node get their own ports.
UNHEALTHY_WORKERS = r"""
import sys, time
from monitoring.exporter import MetricsExporter
from monitoring.metrics import TrainingMetrics
sd_dir, seconds = sys.argv[1], float(sys.argv[2])
workers = [TrainingMetrics("unhealthy", "cats", rank) for rank in (0, 1)]
exporters = [MetricsExporter(w.registry, "127.0.0.1", 0, sd_dir, labels=w.labels).start() for w in workers]
now = time.time()
for w in workers:
    w.total_steps.set(1000); w.flops_per_image.set(1e9)
    w.record_restart("worker_failure")
    w.record_checkpoint(3.0, 12345, when=now - 10000)
step, end = 0, time.time() + seconds
while time.time() < end:
    step += 1
    for w in workers:
        w.record_step(step, images=4, seconds=1.0, losses={"total": 1.0, "photometric": 0.5},
                      sections={"data_wait": 0.6, "forward": 0.1, "nets_forward": 0.05, "render": 0.05, "loss": 0.1,
                                "perceptual_forward": 0.05, "backward": 0.1, "optimizer": 0.1},
                      grad_norm=1.0, learning_rate=1e-4, nonfinite=w is workers[0], epoch=0)
        w.last_step_time.set(now - 3600)
        w.record_skipped("corrupt", 1)
        w.record_queue(0, 4)
        w.record_throughput(8.0, peak_flops=1e12)
        w.record_gpu(0.9, 2e9, 8e10, 3e9)
    time.sleep(0.2)
for e in exporters:
    e.close()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Prometheus:
    def __init__(self, tmp: Path):
        self.sd_dir = tmp / "sd"
        self.sd_dir.mkdir()
        config_dir = tmp / "prom"
        config_dir.mkdir()
        shutil.copy(ALERTS, config_dir / "alerts.yml")
        self.config = config_dir / "prometheus.yml"
        shipped = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
        shipped["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
        shipped["scrape_configs"][0]["file_sd_configs"] = [{"files": [str(self.sd_dir / "*.json")], "refresh_interval": "1s"}]
        self.config.write_text(yaml.safe_dump(shipped))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(tmp / "prometheus.log", "w")
        self.process = subprocess.Popen(
            ["prometheus", f"--config.file={self.config}", f"--storage.tsdb.path={tmp / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}"], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 30
        while True:
            try:
                urllib.request.urlopen(self.url + "/-/ready", timeout=1)
                break
            except OSError:
                if time.time() > deadline or self.process.poll() is not None:
                    self.stop()
                    raise RuntimeError("prometheus did not start: " + (tmp / "prometheus.log").read_text()[-2000:])
                time.sleep(0.2)

    def api(self, path: str, **params) -> dict:
        url = f"{self.url}/api/v1/{path}?" + urllib.parse.urlencode(params)
        try:
            return json.load(urllib.request.urlopen(url, timeout=10))
        except urllib.error.HTTPError as error:
            return json.load(error)

    def query(self, expr: str, at: float | None = None) -> list:
        params = {"query": expr} | ({"time": f"{at:.3f}"} if at else {})
        answer = self.api("query", **params)
        assert answer["status"] == "success", (expr, answer)
        return answer["data"]["result"]

    def wait_for(self, expr: str, timeout: float = 60) -> list:
        deadline = time.time() + timeout
        while time.time() < deadline:
            result = self.query(expr)
            if result:
                return result
            time.sleep(0.5)
        raise AssertionError(f"no data for {expr} after {timeout} s")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


def grafana_to_promql(expr: str) -> str:
    """The dashboard's Grafana variables, as Grafana would substitute them with 'All' selected."""
    expr = expr.replace("$__rate_interval", "1m")
    return re.sub(r"\$\{?(run|category|rank)\}?", ".*", expr)


def dashboard_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def alert_rules() -> list[dict]:
    return [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]


def test_dashboard_has_the_structure_grafana_imports():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] and isinstance(dashboard["schemaVersion"], int)
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert {"run", "category", "rank"} <= set(variables)
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    graphs = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len(graphs) >= 20
    for panel in graphs:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"} and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["refId"] and target["expr"], panel["title"]
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("fleet", "images/s", "loss", "data", "gpu", "checkpoint", "mfu", "restart", "validation"):
        assert topic in titles, topic


@needs_prometheus
def test_promtool_accepts_rules_and_config(tmp_path):
    check = subprocess.run(["promtool", "check", "rules", str(ALERTS)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    shutil.copy(MONITORING / "prometheus.yml", tmp_path / "prometheus.yml")
    shutil.copy(ALERTS, tmp_path / "alerts.yml")
    check = subprocess.run(["promtool", "check", "config", str(tmp_path / "prometheus.yml")], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


@needs_prometheus
def test_a_training_run_is_scraped_and_every_query_returns_data(synthetic_root, tmp_path, caplog):
    from cluster.data_source import train

    caplog.set_level(logging.INFO, logger="trainer.loop.monitor")
    prometheus = Prometheus(tmp_path)
    unhealthy = None
    try:
        unhealthy = subprocess.Popen([sys.executable, "-c", UNHEALTHY_WORKERS, str(prometheus.sd_dir), "120"], cwd=ROOT)
        # A target that is announced but does not answer: WorkerDown.
        (prometheus.sd_dir / "gone.json").write_text(json.dumps(
            [{"targets": [f"127.0.0.1:{free_port()}"], "labels": {"run": "gone", "category": "cats", "rank": "0"}}]))

        config = small_config(synthetic_root, tmp_path / "run", max_steps=40, checkpoint_every=4, log_every=2)
        config.monitoring.sd_dir = str(prometheus.sd_dir)
        config.monitoring.run_name = "healthy"
        config.monitoring.peak_tflops = 1.0  # a CPU has no datasheet peak: configured, to show MFU
        config.train.eval_every = 10  # validation series (the val split of synthetic_root has depth)
        outcome: dict = {}
        runner = threading.Thread(target=lambda: outcome.update(result=train(config)), daemon=True)
        runner.start()
        # Scraped several times while it trains (1 s scrapes), with a checkpoint saved by then.
        prometheus.wait_for('count_over_time(unsup3d_train_step{run="healthy"}[1m]) >= 5 '
                            'and on() unsup3d_checkpoint_saves_total{run="healthy"} > 0', timeout=150)
        prometheus.wait_for('count_over_time(unsup3d_train_step{run="unhealthy"}[1m]) >= 5', timeout=30)
        at = time.time()
        healthy = {}
        for name in ("unsup3d_train_step", "unsup3d_train_images_total", "unsup3d_train_loss",
                     "unsup3d_train_section_seconds_total", "unsup3d_train_mfu_ratio", "unsup3d_train_flops_per_image",
                     "unsup3d_checkpoint_save_seconds", "unsup3d_checkpoint_size_bytes", "unsup3d_train_learning_rate",
                     "unsup3d_validation_side", "unsup3d_validation_mad_degrees", "unsup3d_validation_step"):
            healthy[name] = prometheus.query(f'{name}{{run="healthy",category="synthetic",rank="0"}}', at)
            assert healthy[name], name
        sections = {s["metric"]["section"] for s in healthy["unsup3d_train_section_seconds_total"]}
        assert {"data_wait", "forward", "nets_forward", "render", "loss", "perceptual_forward", "backward", "optimizer"} <= sections
        assert float(healthy["unsup3d_checkpoint_size_bytes"][0]["value"][1]) > 0
        assert {s["metric"]["method"] for s in healthy["unsup3d_validation_side"]} == {
            "model", "constant_depth", "average_train_depth"}
        assert {(s["metric"]["method"], s["metric"]["normals"]) for s in healthy["unsup3d_validation_mad_degrees"]} == {
            (m, n) for m in ("model", "constant_depth", "average_train_depth") for n in ("reference", "exact")}
        assert prometheus.query('rate(unsup3d_train_images_total{run="healthy"}[1m]) > 0', at)
        up = prometheus.query('up{job="unsup3d"}', at)
        assert {s["metric"]["run"]: s["value"][1] for s in up}["healthy"] == "1"

        for expr in dashboard_expressions():
            assert prometheus.query(grafana_to_promql(expr), at), f"dashboard query returned no data: {expr}"
        variables = json.loads(DASHBOARD.read_text())["templating"]["list"]
        for variable in variables:
            match = re.fullmatch(r"label_values\((.+), (\w+)\)", variable.get("definition", ""))
            if match:
                assert prometheus.query(grafana_to_promql(f"group by ({match[2]}) ({match[1]})"), at), variable["name"]

        for rule in alert_rules():
            result = prometheus.query(rule["expr"], at)
            assert result, f"alert {rule['alert']} did not hold on the unhealthy workers: {rule['expr']}"
            runs = {s["metric"].get("run") for s in result}
            assert "healthy" not in runs or rule["alert"] in ("DataStarvation",), (rule["alert"], runs)
            assert runs & {"unhealthy", "gone"}, (rule["alert"], runs)
        rules = prometheus.api("rules")["data"]["groups"][0]["rules"]
        assert rules and all(r["health"] == "ok" for r in rules), rules

        runner.join(timeout=240)
        assert outcome["result"].steps == 40
        assert not list(prometheus.sd_dir.glob("healthy_*.json"))  # removed at the end of the run
        # the address as one log line, once
        assert [r.name for r in caplog.records if "metrics: http://127.0.0.1:" in r.getMessage()] == ["trainer.loop.monitor"]
    finally:
        if unhealthy is not None:
            unhealthy.terminate()
            unhealthy.wait(timeout=20)
        prometheus.stop()
