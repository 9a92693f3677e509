"""Strict JSON for result files and the CLI's output: Python's json writes NaN and Infinity, which
other JSON readers (jq, browsers, Grafana) reject. An undefined number (the std over one image, a
metric with no valid pixel) is written as null."""

from __future__ import annotations

import json
import math
from typing import Any


def finite_or_none(value: Any) -> Any:
    """value with every non-finite float, at any depth of dicts, lists and tuples, replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def json_text(value: Any, **kwargs) -> str:
    """json.dumps of finite_or_none(value); allow_nan=False makes a missed case an error, not bad JSON."""
    return json.dumps(finite_or_none(value), allow_nan=False, **kwargs)
