"""Training steps of the default recipe with 1 and with every-core torch threads, OpenMP waiting by spinning
(ACTIVE, libgomp's default) or by sleeping (PASSIVE, what `unsup3d` sets), each variant in a fresh
process (OpenMP reads OMP_WAIT_POLICY once, when torch loads it), in rounds.

    python benchmarks/bench_omp_wait.py --rounds 2

On a machine shared with other jobs, spinning threads wait for a partner that is not scheduled; this
measures what that costs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

STEPS = r"""
import json, sys, time, torch, yaml
from trainer.model.config import LossConfig, ModelConfig
from trainer.model.unsup3d import Unsup3D, Unsup3DLoss
torch.manual_seed(0)
threads, batch, steps = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(threads)
recipe = yaml.safe_load(open("configs/default.yaml"))
model_config = ModelConfig(**recipe["model"])
model = Unsup3D(model_config)
criterion = Unsup3DLoss(LossConfig(**recipe["loss"]), None, model_config)
optimizer = torch.optim.Adam(model.parameters(), 1e-4)
image = torch.rand(batch, 3, model_config.image_size, model_config.image_size) * 2 - 1
times = []
for _ in range(steps + 1):  # the first step warms up
    started = time.perf_counter()
    loss = criterion(image, model.decompose(image))["total"]
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    times.append(time.perf_counter() - started)
print(json.dumps({"images_per_second": batch * steps / sum(times[1:])}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    results: dict[str, list[float]] = {}
    for r in range(args.rounds):
        for policy in ("ACTIVE", "PASSIVE"):
            for threads in sorted({1, cores}):
                env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_WAIT_POLICY": policy}
                done = subprocess.run([sys.executable, "-c", STEPS, str(threads), str(args.batch), str(args.steps)],
                                      cwd=ROOT, env=env, capture_output=True, text=True, check=True)
                rate = json.loads(done.stdout.strip().splitlines()[-1])["images_per_second"]
                name = f"{policy} {threads} thread(s)"
                results.setdefault(name, []).append(rate)
                print(json.dumps({"round": r, "variant": name, "images_per_second": round(rate, 2),
                                  "load": os.getloadavg()[0]}), flush=True)
    for name, rates in results.items():
        print(f"{name}: {sum(rates) / len(rates):.1f} img/s (rounds: {', '.join(f'{x:.1f}' for x in rates)})")


if __name__ == "__main__":
    main()
