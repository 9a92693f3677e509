"""`unsup3d fleet --config FLEET.yaml` (train every category) and `unsup3d fleet status --config FLEET.yaml`."""

from __future__ import annotations

import argparse
import json


def cmd_fleet(args: argparse.Namespace) -> int:
    from cluster.fleet import fleet_status, format_status, run_fleet

    if args.action == "status":
        rows = fleet_status(args.config)
        print(json.dumps(rows, indent=2) if args.json else format_status(rows))
        return 0
    import ray

    from cluster.ray_train import connect

    how = connect(args.address)
    try:
        states = run_fleet(args.config, address=args.address)
    finally:
        if how == "local":
            ray.shutdown()
    print(json.dumps(states))
    return 0 if all(state == "succeeded" for state in states.values()) else 1


def add_fleet_subcommand(sub) -> None:
    p = sub.add_parser("fleet", help="train one model per category, concurrently, on one Ray cluster; "
                       "`fleet status` shows each category")
    p.add_argument("action", nargs="?", choices=("run", "status"), default="run")
    p.add_argument("--config", required=True, help="fleet YAML (see configs/fleet-example.yaml)")
    p.add_argument("--address", help="Ray cluster to join (default $RAY_ADDRESS; neither: a local Ray on 127.0.0.1)")
    p.add_argument("--json", action="store_true", help="status as JSON")
    p.set_defaults(func=cmd_fleet)
