#!/usr/bin/env bash
# The study of docs/results.md: two streams side by side, one torch thread each (one per core), every
# experiment with lr and schedule (constant, cosine) tuned on 5-point grids and 30 (MLP) / 20 (CNN)
# epochs. Stream A: width (core set, then all widths), invariance, its s = 1e-6 control, the
# full-length check at width 512; stream B: depth (core set, then all depths), BN ResNet, the
# full-length checks of the plain CNN and of the plain MLPs at every depth. Each later call of an experiment resumes
# from its runs.jsonl, so the wider settings only add runs; creating OUT/STOP_EXTRA before a stage
# skips the full-length checks.
# Usage (repository root): bash experiments/study/run_study.sh [OUT]   (default results/study)
set -u
OUT=${1:-results/study}
FULL=${FULL:-$OUT-full-epochs}
PY=${PY:-python}
export PYTHONPATH=$PWD
COMMON="--threads 1 --grid-points 5"
mkdir -p "$OUT/logs"
run() {  # run LOG ARGS...: one experiment, its stdout/stderr and timing to OUT/logs/LOG.*
  local log=$1; shift
  echo "[$(date +%T) load $(cut -d' ' -f1-3 /proc/loadavg)] start $*" >>"$OUT/logs/$log.log"
  $PY -m experiments.study.experiments "$@" $COMMON >>"$OUT/logs/$log.log" 2>>"$OUT/logs/$log.err"
  local rc=$?
  echo "[$(date +%T) load $(cut -d' ' -f1-3 /proc/loadavg)] end rc=$rc $*" >>"$OUT/logs/$log.log"
}
control() {  # the invariance runs again at s = 1e-6 (float32 rounding only), on a copy of its store
  mkdir -p "$OUT/control/invariance"
  cp "$OUT/invariance/runs.jsonl" "$OUT/control/invariance/runs.jsonl"
  run A invariance --spreads 0,1e-6 --epoch-scale 0.5 --out "$OUT/control"
  rm -rf "$OUT/invariance-control" && mv "$OUT/control/invariance" "$OUT/invariance-control" && rmdir "$OUT/control"
}
(
  run A width --only width=32,128,512 --epoch-scale 0.5 --out "$OUT"
  run A invariance --spreads 0,0.5,1,2,3 --epoch-scale 0.5 --out "$OUT"
  run A width --epoch-scale 0.5 --out "$OUT"
  control
  [ -e "$OUT/STOP_EXTRA" ] || run A width --only width=512 --out "$FULL"
) &
(
  run B depth --only depth=4,8,12 --epoch-scale 0.5 --out "$OUT"
  run B bn-resnet --epoch-scale 0.5 --out "$OUT"
  run B depth --epoch-scale 0.5 --out "$OUT"
  [ -e "$OUT/STOP_EXTRA" ] || run B depth --only model=plain_cnn --out "$FULL"
  [ -e "$OUT/STOP_EXTRA" ] || run B depth --only model=plain_mlp --out "$FULL/mlp-depths"
) &
wait
