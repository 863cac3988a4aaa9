#!/usr/bin/env bash
# The real-MNIST study of docs/results.md (issue 19), as run: one stream, one torch thread, under nice
# (the machine was shared with other jobs, load average 5-8 on 2 cores), lr and schedule (constant,
# cosine) tuned on 3-point grids (+ edge extensions), 30 epochs for the MLP (--epoch-scale 0.5),
# 10 for the CNN, 20 for the width sweep (time), the per-epoch timings before the width sweep.
# Each experiment resumes from its store; mnist-invariance reuses mnist-mlp's runs (same configs).
# WAIT=PID waits for that process first (the stream was reordered while it ran). Creating
# OUT/STOP_EXTRA skips the last stage (width 128), as for docs/results.md.
# Usage (repository root): bash experiments/study/run_mnist.sh [OUT]   (default results/study)
set -u
OUT=${1:-results/study}
PY=${PY:-python}
export PYTHONPATH=$PWD
COMMON="--threads 1 --grid-points 3 --out $OUT"
mkdir -p "$OUT/logs"
run() {  # run LOG MODULE ARGS...: its stdout/stderr and timing to OUT/logs/LOG.*
  local log=$1; shift
  echo "[$(date +%T) load $(cut -d' ' -f1-3 /proc/loadavg)] start $*" >>"$OUT/logs/$log.log"
  nice -n 15 $PY -m "$@" >>"$OUT/logs/$log.log" 2>>"$OUT/logs/$log.err"
  local rc=$?
  echo "[$(date +%T) load $(cut -d' ' -f1-3 /proc/loadavg)] end rc=$rc $*" >>"$OUT/logs/$log.log"
}
[ -n "${WAIT:-}" ] && while kill -0 "$WAIT" 2>/dev/null; do sleep 5; done
run mnist experiments.study.experiments mnist-mlp $COMMON --epoch-scale 0.5
run mnist experiments.study.experiments mnist-cnn $COMMON --epochs 10
run mnist experiments.study.experiments mnist-invariance $COMMON --epoch-scale 0.5
run mnist experiments.study.timing --out "$OUT" --epochs 2 --rounds 2 --threads 1
run mnist experiments.study.experiments mnist-width $COMMON --epochs 20 --only width=32,256
# width 128, which this line adds to the width store (not in the first round of docs/results.md; run 2026-12-07 17:20)
[ -e "$OUT/STOP_EXTRA" ] || run mnist experiments.study.experiments mnist-width $COMMON --epochs 20
