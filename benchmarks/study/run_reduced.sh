#!/usr/bin/env bash
# The reduced study of docs/results.md: two streams side by side, one torch thread each (one per core).
# Stream A: width (core set), invariance, then the extra widths; stream B: depth (core set), BN ResNet,
# then the extra depths. Each later call of an experiment resumes from its runs.jsonl, so the extra
# settings only add runs; cutting scope means stopping before a stage.
# Usage (repository root): bash benchmarks/study/run_reduced.sh [OUT]   (default results/study)
set -u
OUT=${1:-results/study}
PY=${PY:-/work/main/.venv/bin/python}
export PYTHONPATH=$PWD
COMMON="--out $OUT --threads 1 --grid-points 5 --epoch-scale 0.5"
mkdir -p "$OUT/logs"
run() {  # run NAME LOG ARGS...: one experiment, its stdout/stderr and timing to LOG
  local log=$1; shift
  echo "[$(date +%T) load $(cut -d' ' -f1-3 /proc/loadavg)] start $*" >>"$OUT/logs/$log.log"
  $PY -m benchmarks.study.experiments "$@" $COMMON >>"$OUT/logs/$log.log" 2>>"$OUT/logs/$log.err"
  local rc=$?
  echo "[$(date +%T) load $(cut -d' ' -f1-3 /proc/loadavg)] end rc=$rc $*" >>"$OUT/logs/$log.log"
}
(
  run A width --only width=32,128,512
  run A invariance --spreads 0,1,2,3
  [ -e "$OUT/STOP_EXTRA" ] || run A width --only width=32,64,128,256,512
) &
(
  run B depth --only depth=4,8,12
  run B bn-resnet
  [ -e "$OUT/STOP_EXTRA" ] || run B depth --only depth=4,6,8,10,12
) &
wait
