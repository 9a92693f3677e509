"""The local run's progress: step, images/s, loss and time left, drawn by tqdm.

On a terminal tqdm redraws one line in place. Elsewhere (a log file, CI, a Ray worker whose output
the driver forwards) the same tqdm line is logged every `every` steps through the logger
`monitoring.progress`, so it follows the run's logging like every other project line instead of
filling a file with carriage returns.

Time left is (steps to go) / (steps per second), measured from the end of the first step, with
pauses (validation) left out: the first step carries one-off costs (the FLOP count, the first batch,
allocator and kernel warm-up) that would otherwise make the first estimates many times too long.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

from tqdm import tqdm

log = logging.getLogger(__name__)

BAR_FORMAT = "{percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} steps [eta {remaining}{postfix}]"


class _Discard:
    """Where a logged (non-terminal) bar's own drawing goes: its line is logged instead."""

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


class ProgressBar:
    def __init__(self, total: int, start_step: int = 0, every: int = 20, stream: TextIO | None = None,
                 min_interval: float = 0.2):
        stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self.every = max(1, every)
        self.total = max(1, total)
        # smoothing=0: tqdm's rate is (n - initial) / (now - start_t), which `_clock` keeps to the
        # steps since the first one finished, minus pauses.
        self.bar = tqdm(total=self.total, initial=start_step, file=stream if self.tty else _Discard(),
                        bar_format=BAR_FORMAT, smoothing=0, mininterval=min_interval, dynamic_ncols=self.tty,
                        ncols=None if self.tty else 80, ascii=not self.tty, leave=True, disable=False)
        self._clock_started = False

    def line(self) -> str:
        """The bar as tqdm formats it (what the terminal shows, what the log gets)."""
        return str(self.bar)

    def update(self, step: int, images_per_second: float | None, loss: float | None) -> None:
        try:
            self._update(step, images_per_second, loss)
        except (OSError, ValueError):  # a closed or broken stderr must not stop training
            pass

    def _update(self, step: int, images_per_second: float | None, loss: float | None) -> None:
        if not self._clock_started:  # the first step done: the rate counts from here
            self._clock_started = True
            self.bar.initial = step
            self.bar.start_t = self.bar._time()
        postfix = []
        if images_per_second:
            postfix.append(f"{images_per_second:.1f} img/s")
        if loss is not None:
            postfix.append(f"loss {loss:.4f}")
        self.bar.set_postfix_str(", ".join(postfix), refresh=False)
        self.bar.update(step - self.bar.n)
        if not self.tty and (step % self.every == 0 or step == self.total):
            log.info("%s", self.line())

    def pause(self, seconds: float) -> None:
        """Time spent on something else (validation) is not training time: keep it out of the rate."""
        self.bar.start_t += seconds

    def close(self) -> None:
        try:
            self.bar.close()
        except (OSError, ValueError):
            pass


__all__ = ["ProgressBar"]
