#!/usr/bin/env bash
# A --no-ray run's process group of one: torch's in-process "fake" backend (UNSUP3D_WORLD_OF_ONE_BACKEND=auto,
# the default on CPU) against gloo (real), alternating, the default config for STEPS steps on DATA:
#   bash benchmarks/bench_world_of_one.sh /path/to/faces [STEPS] [ROUNDS]
# Prints the wall time and the img/s of every 20-step window of each run.
set -eu
data=$1
steps=${2:-80}
rounds=${3:-2}
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python=${PYTHON:-python}
for round in $(seq "$rounds"); do
  for backend in auto real; do
    out=$(mktemp -d)
    start=$(date +%s.%N)
    UNSUP3D_WORLD_OF_ONE_BACKEND=$backend $python -m cluster.cli train --no-ray --config configs/default.yaml \
      --set data.root="$data" --set train.out_dir="$out/run" --set train.max_steps="$steps" \
      --set train.eval_every=0 --set train.checkpoint_every=100000 --set train.log_every=20 \
      --set monitoring.progress_bar=false >/dev/null 2>"$out/stderr" || { cat "$out/stderr"; exit 1; }
    end=$(date +%s.%N)
    $python - "$out/run/metrics.jsonl" "$backend" "$round" "$start" "$end" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if '"images_per_second"' in line]
print(f"{sys.argv[2]:5s} round {sys.argv[3]}: wall {float(sys.argv[5]) - float(sys.argv[4]):.1f} s, img/s per window",
      [round(r["images_per_second"], 1) for r in rows])
PY
    rm -rf "$out"
  done
done
