#!/usr/bin/env bash
# Set up the environment and train end to end on the embedded default (generated faces, CPU or GPU).
# Extra arguments go to `unsup3d train`, e.g. --max-steps 50.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/env.sh"
cd "$ROOT"
# --workers auto: on an idle machine, single-threaded workers that share the batch train faster than
# one worker with every thread (BENCHMARKS.md, "The default in about 15 minutes"); --workers 1 gives
# one worker every core, the better choice on a machine busy with other work.
unsup3d train --config configs/default.yaml --workers auto "$@"
unsup3d evaluate --checkpoint runs/default/checkpoints --data data/faces --output runs/default/evaluation.json
