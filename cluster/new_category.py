"""`unsup3d new-category`: a run config for a new category from configs/templates/category.yaml."""

from __future__ import annotations

import argparse
import string
from pathlib import Path

TEMPLATE = Path(__file__).resolve().parents[1] / "configs" / "templates" / "category.yaml"


def render_category_config(category: str, shards: str, out_dir: str | None = None, batch_size: int = 64,
                           template: str | Path = TEMPLATE) -> str:
    if not category.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"category {category!r}: use letters, digits, - and _ (it names folders and metrics)")
    text = Path(template).read_text()
    return string.Template(text).substitute(category=category, shards=shards, batch_size=batch_size,
                                            out_dir=out_dir or f"runs/{category}")


def cmd_new_category(args: argparse.Namespace) -> int:
    from cluster.job_config import load_job_config

    out = Path(args.out)
    if out.exists() and not args.force:
        raise ValueError(f"{out} exists (use --force to overwrite)")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_category_config(args.category, args.shards, args.out_dir, args.batch_size,
                                          args.template or TEMPLATE))
    load_job_config(out)  # the written file must load: fail now, not when a cluster picks it up
    print(out)
    return 0


def add_new_category_subcommand(sub) -> None:
    p = sub.add_parser("new-category", help="write a run config for a new category from the template")
    p.add_argument("--category", required=True)
    p.add_argument("--shards", required=True, help="the prepared shards (folder or s3://) of this category")
    p.add_argument("--out", required=True, help="config file to write, e.g. configs/<category>.yaml")
    p.add_argument("--out-dir", help="train.out_dir (default runs/<category>)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--template", help="template file (default configs/templates/category.yaml)")
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=cmd_new_category)
