#!/usr/bin/env bash
# Run a benchmark with your own background processes paused, so that it has the machine to itself:
#   bash benchmarks/paused.sh "PID PID ..." python benchmarks/bench_speed.py ...
# The PIDs get SIGSTOP before the command and SIGCONT after it, also when it fails or is interrupted.
# Only pause processes you started (a training run of yours); their own img/s log shows the gap.
set -u
pids=$1
shift
resume() { for pid in $pids; do kill -CONT "$pid" 2>/dev/null; done; }
trap resume EXIT
for pid in $pids; do kill -STOP "$pid"; done
"$@"
