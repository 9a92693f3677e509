"""A one-line progress display on stderr: step, images/s, loss and time left.

On a terminal the line is redrawn in place; otherwise (a log file, CI) a plain line is printed every
`every` steps instead, so logs stay readable. No dependency.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


class ProgressBar:
    def __init__(self, total: int, start_step: int = 0, every: int = 20, stream: TextIO | None = None,
                 width: int = 24, min_interval: float = 0.2):
        self.total = max(1, total)
        self.start_step = start_step
        self.every = max(1, every)
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.width = width
        self.min_interval = min_interval
        self.started = time.perf_counter()
        self._last_draw = 0.0
        self._drawn = False

    def line(self, step: int, images_per_second: float | None, loss: float | None) -> str:
        done = step - self.start_step
        elapsed = time.perf_counter() - self.started
        eta = elapsed / done * (self.total - step) if done > 0 else None
        filled = int(self.width * step / self.total)
        bar = "#" * filled + "-" * (self.width - filled)
        parts = [f"[{bar}] {step}/{self.total}"]
        parts.append(f"{images_per_second:.1f} img/s" if images_per_second else "- img/s")
        parts.append(f"loss {loss:.4f}" if loss is not None else "loss -")
        parts.append(f"eta {format_duration(eta)}" if eta is not None else "eta -")
        return "  ".join(parts)

    def update(self, step: int, images_per_second: float | None, loss: float | None) -> None:
        try:
            self._update(step, images_per_second, loss)
        except (OSError, ValueError):  # a closed or broken stderr must not stop training
            pass

    def _update(self, step: int, images_per_second: float | None, loss: float | None) -> None:
        now = time.perf_counter()
        if self.tty:
            if now - self._last_draw < self.min_interval and step < self.total:
                return
            self.stream.write("\r\x1b[2K" + self.line(step, images_per_second, loss))
            self._drawn = True
        elif step % self.every == 0 or step == self.total:
            self.stream.write(self.line(step, images_per_second, loss) + "\n")
        else:
            return
        self._last_draw = now
        self.stream.flush()

    def close(self) -> None:
        if self.tty and self._drawn:
            try:
                self.stream.write("\n")
                self.stream.flush()
            except (OSError, ValueError):
                pass
        self._drawn = False
