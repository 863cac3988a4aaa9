#!/usr/bin/env bash
# The later stages of the issue-19 study (after run_mnist.sh), as run for docs/results.md: one stream,
# one torch thread, nice 15 (the machine was shared: see the load averages in OUT/logs/more.log).
# Each experiment resumes from its store (the methods already run are read back, not retrained).
# Usage (repository root): bash experiments/study/run_more.sh OUT STAGE...
# As run: adam-skeleton, then bn-exact bn-invariance resnet18 (after merging main's exact BN detection),
# then bn-timing by hand (the same command as below, logged in OUT/logs/more.log).
#   adam-skeleton  Adam and AdamW from the skeleton init on the MLP (30 epochs) and the CNN (10 epochs)
#   bn-exact       BN ResNet, all four methods (needs detect_topology(bn_mode="exact"))
#   resnet18       ResNet-18, all four methods
#   bn-invariance  the BN ResNet from S1+S2-rescaled starts, s = 1e-6, 1, 3
#   bn-timing      seconds per epoch of the four BN methods, side by side (OUT/bn-timing)
set -u
OUT=${1:-results/study}
shift
PY=${PY:-python}
export PYTHONPATH=$PWD
COMMON="--threads 1 --grid-points 3 --out $OUT"
mkdir -p "$OUT/logs"
run() {  # run MODULE ARGS...: its stdout/stderr and timing to OUT/logs/more.*
  echo "[$(date +%T) load $(cut -d' ' -f1-3 /proc/loadavg)] start $*" >>"$OUT/logs/more.log"
  nice -n 15 $PY -m "$@" >>"$OUT/logs/more.log" 2>>"$OUT/logs/more.err"
  local rc=$?
  echo "[$(date +%T) load $(cut -d' ' -f1-3 /proc/loadavg)] end rc=$rc $*" >>"$OUT/logs/more.log"
}
E=experiments.study.experiments
for stage in "$@"; do
  case $stage in
    adam-skeleton)
      run $E mnist-mlp $COMMON --epoch-scale 0.5
      run $E mnist-cnn $COMMON --epochs 10 ;;
    bn-exact)
      run $E bn-exact $COMMON --epoch-scale 0.5 ;;
    resnet18)
      run $E mnist-resnet18 $COMMON --epoch-scale 0.5 ;;
    bn-invariance)
      run $E bn-invariance $COMMON --epoch-scale 0.5 ;;
    bn-timing)
      run experiments.study.timing --out "$OUT" --epochs 2 --rounds 2 --threads 1 \
        --only bn-exact,mnist-resnet18 --folder bn-timing ;;
    *) echo "unknown stage $stage" >&2; exit 2 ;;
  esac
done
