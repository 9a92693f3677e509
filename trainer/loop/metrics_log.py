"""metrics.jsonl, the run's record of every logged step: on resume the steps the checkpoint does not
cover are dropped, because the resumed run logs them again."""

from __future__ import annotations

import json
from pathlib import Path

from trainer.loop.safe_files import write_atomically


def drop_records_after(path: Path, step: int) -> int:
    """Rewrite metrics.jsonl without the records of steps after `step` (and any torn last line): a run
    resumed from the checkpoint of `step` redoes those steps and logs them again, so every step appears
    once, with the values of the run the checkpoints continue. Returns how many lines were dropped."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
            keep = not isinstance(entry, dict) or not isinstance(entry.get("step"), int) or entry["step"] <= step
        except ValueError:
            keep = False  # a line cut short when the previous run was killed
        if keep:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        write_atomically(path, "".join(line + "\n" for line in kept).encode())
    return dropped
