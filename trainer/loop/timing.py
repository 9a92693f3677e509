"""Step-time breakdown: named sections timed with wall-clock, synchronising CUDA at the edges.

Used by the training loop's logs and by the benchmark. A disabled timer costs nothing and never
synchronises, so it can stay in the hot path.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Iterator

import torch


class SectionTimer:
    def __init__(self, enabled: bool = True, device: torch.device | None = None):
        self.enabled = enabled
        self.synchronize = enabled and device is not None and device.type == "cuda"
        self.totals: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        if self.synchronize:
            torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.synchronize:
                torch.cuda.synchronize()
            self.totals[name] += time.perf_counter() - start

    def reset(self) -> dict[str, float]:
        totals, self.totals = dict(self.totals), defaultdict(float)
        return totals


NO_TIMER = SectionTimer(enabled=False)
