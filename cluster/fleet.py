"""Fleets: one model per category, trained side by side on one Ray cluster.

A fleet file lists categories; each points at its run config and says how many workers, CPUs and GPUs
it may use. Every member is its own Ray Train run (own workers, own restarts, own out_dir, own run name
and category label for metrics); Ray queues a member until its resources are free. A member that
fails (after its own max_failures restarts) is recorded as failed; the others go on. The fleet's state
(`<state_dir>/fleet_state.json`) plus every member's out_dir is what `unsup3d fleet status` reads.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from trainer.config_loading import ConfigError, load_yaml_config

log = logging.getLogger(__name__)

STATE_FILE = "fleet_state.json"


@dataclass
class FleetMember:
    category: str
    """Category name: the metrics label, the run name suffix and the default out_dir name."""
    config: str
    """Run config YAML of this category (relative paths: to the fleet file's directory, then the cwd)."""
    out_dir: str | None = None
    """Default: <state_dir>/<category>. Local, shared filesystem, or s3://."""
    workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    max_failures: int = 1
    max_steps: int | None = None


@dataclass
class FleetConfig:
    name: str
    state_dir: str
    members: list[FleetMember] = field(default_factory=list)

    def __post_init__(self):
        names = [m.category for m in self.members]
        if not names:
            raise ValueError("members: a fleet needs at least one category")
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"members: category {duplicates[0]!r} is listed twice")


def load_fleet_config(path: str | Path) -> FleetConfig:
    return load_yaml_config(FleetConfig, path)


def _resolve(path: str, base: Path) -> str:
    if "://" in path or Path(path).is_absolute():
        return path
    beside = base / path
    return str(beside) if beside.exists() else path


def member_job_config(fleet: FleetConfig, member: FleetMember, fleet_file: Path):
    from cluster.job_config import load_job_config

    overrides = {"category": member.category,
                 "train.out_dir": member.out_dir or str(Path(fleet.state_dir) / member.category)}
    if member.max_steps is not None:
        overrides["train.max_steps"] = member.max_steps
    return load_job_config(_resolve(member.config, fleet_file.parent), overrides)


class FleetState:
    """fleet_state.json, rewritten atomically on every change."""

    def __init__(self, fleet: FleetConfig):
        self.path = Path(fleet.state_dir) / STATE_FILE
        self.lock = threading.Lock()
        self.state = {"fleet": fleet.name, "members": {}}

    def update(self, category: str, **fields) -> None:
        with self.lock:
            self.state["members"].setdefault(category, {}).update(fields, updated=time.time())
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
            tmp.write_text(json.dumps(self.state, indent=2))
            tmp.replace(self.path)


def run_fleet(fleet_file: str | Path, address: str | None = None) -> dict:
    """Train every member concurrently; returns {category: final state}. Never raises for one member."""
    from cluster.ray_train import Resources, run_training

    fleet_file = Path(fleet_file)
    fleet = load_fleet_config(fleet_file)
    state = FleetState(fleet)
    configs = {}
    for member in fleet.members:  # bad member configs fail that member only, before anything starts
        try:
            configs[member.category] = member_job_config(fleet, member, fleet_file)
            state.update(member.category, state="pending", out_dir=configs[member.category].train.out_dir,
                         run=f"{fleet.name}-{member.category}", error=None)
        except (ConfigError, ValueError, OSError) as error:
            state.update(member.category, state="failed", error=str(error))

    def run_member(member: FleetMember) -> None:
        category = member.category
        resources = Resources(member.workers, member.cpus_per_worker, member.gpus_per_worker, member.max_failures)
        state.update(category, state="running", started=time.time())
        try:
            summary = run_training(configs[category], resources, run_name=f"{fleet.name}-{category}", address=address)
        except Exception as error:  # noqa: BLE001 - one category's failure must not stop the others
            log.error("fleet %s: category %s failed: %s", fleet.name, category, error)
            state.update(category, state="failed", error=f"{type(error).__name__}: {error}"[:2000],
                         traceback=traceback.format_exc()[-4000:], ended=time.time())
            return
        state.update(category, state="succeeded", ended=time.time(), step=summary.get("step"),
                     checkpoint=summary.get("checkpoint"))

    runnable = [m for m in fleet.members if m.category in configs]
    if runnable:
        from cluster.ray_train import connect

        connect(address)  # once, before the threads: every member shares this driver's connection
        with ThreadPoolExecutor(max_workers=len(runnable), thread_name_prefix="fleet") as pool:
            list(pool.map(run_member, runnable))
    return {c: m["state"] for c, m in state.state["members"].items()}


def fleet_status(fleet_file: str | Path) -> list[dict]:
    """Per category: state (pending/running/succeeded/failed, or not-started), step, last loss, last checkpoint."""
    from cluster.ray_train import summarize_run

    fleet_file = Path(fleet_file)
    fleet = load_fleet_config(fleet_file)
    path = Path(fleet.state_dir) / STATE_FILE
    recorded = json.loads(path.read_text())["members"] if path.exists() else {}
    rows = []
    for member in fleet.members:
        entry = recorded.get(member.category, {})
        out_dir = entry.get("out_dir") or member.out_dir or str(Path(fleet.state_dir) / member.category)
        summary = summarize_run(out_dir)
        rows.append({"category": member.category, "state": entry.get("state", "not-started"),
                     "step": summary.get("step"), "loss": summary.get("loss"),
                     "checkpoint": summary.get("checkpoint"), "out_dir": out_dir, "error": entry.get("error")})
    return rows


def format_status(rows: list[dict]) -> str:
    header = f"{'category':<16} {'state':<12} {'step':>8} {'loss':>10}  checkpoint"
    lines = [header]
    for row in rows:
        loss = "-" if row["loss"] is None else f"{row['loss']:.4f}"
        step = "-" if row["step"] is None else str(row["step"])
        lines.append(f"{row['category']:<16} {row['state']:<12} {step:>8} {loss:>10}  {row['checkpoint'] or '-'}")
        if row["error"]:
            lines.append(f"{'':<16} error: {row['error'].splitlines()[0][:200]}")
    return "\n".join(lines)
