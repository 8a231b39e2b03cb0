#!/bin/bash
# The CIFAR-10 trade-off runs (benchmarks/tradeoff.py --data cifar10: the same recipes, overrides and run names,
# so that `tradeoff.py --report-only` accepts them) trained in parallel on one GPU, as they were on 2026-12-04
# (one H200 lent for 15 minutes; docs/RESULTS.md). Each run is a `skipnet train` command; phase 1 trains SP and
# the plain ResNets 14-38 at once, phase 2 the stages from the SP run (learned HRL at two targets, HRL as it was
# before 2026-12-04, calibrate, the paper's HRL). Smoke-tests every stage for a few steps first (exit 3 when one
# fails), stops every run at DEADLINE seconds (SIGTERM: each writes a checkpoint; continue it with
# `skipnet train --run-dir RUN --resume`, on any device), and packs the run folders into $OUT in 15 MB parts.
# Run from the repository root:
#   OUT=/tmp/out DEADLINE=520 bash scripts/tradeoff-cifar10-gpu.sh
# Rerun it to continue: finished runs are left alone, interrupted ones resume (RUNS_FROM: where earlier run
# folders come from, e.g. a copy carried to another machine).
# Data: the CIFAR-10 JPEG copy in ../shared/datasets/cifar10-jpeg (train.zip/test.zip, or train/ and test/), or
# DATA_ARCHIVE, a tar.xz of train/ and test/ unpacked there (the form in which the images travelled to the GPU:
# the JPEG files' bytes, 18.5 MB). MPS (several processes' kernels at once) is used when the driver offers it.
set -u
T0=$(date +%s)
el() { echo $(( $(date +%s) - T0 )); }
DEADLINE=${DEADLINE:-520}
TINY=${TINY:-0}   # 1: every run a few steps (a dry run of this script on a CPU)
PY=${PY:-python3}
R=${RUNS:-/work/runs/tradeoff-cifar10}
X=${EXTRA:-/work/runs/c10-extra}
OUTD=${OUT:-/tmp/gpu-out}
DATA=../shared/datasets/cifar10-jpeg
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
SK="$PY -m skipnet.cli"
mkdir -p "$R" "$X" "$OUTD" "$DATA"
# RUNS_FROM: a folder holding earlier run folders of $R and $X by their names (e.g. carried to the GPU machine);
# copied in first, so that finished runs are kept and interrupted ones resume (their train.init paths are absolute)
if [ -n "${RUNS_FROM:-}" ]; then cp -rn "$RUNS_FROM/$(basename $R)/." "$R/" 2>/dev/null; cp -rn "$RUNS_FROM/$(basename $X)/." "$X/" 2>/dev/null; fi
if [ ! -e "$DATA/train.zip" ] && [ ! -d "$DATA/train" ]; then tar xJf "${DATA_ARCHIVE:?no CIFAR-10 in $DATA}" -C "$DATA" || exit 1; fi
echo "data ready $(el)s: $(ls $DATA)"
nvidia-smi --query-gpu=name,memory.used,driver_version --format=csv 2>/dev/null
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
MPS=0
if [ "$TINY" = 0 ] && command -v nvidia-cuda-mps-control >/dev/null; then
  nvidia-cuda-mps-control -d && MPS=1 && echo "MPS daemon started"
  if ! $PY -c "import torch; torch.zeros(1, device='cuda'); print('cuda under MPS ok')"; then
    echo quit | nvidia-cuda-mps-control; MPS=0; echo "MPS off"
  fi
fi
$PY - <<EOF || exit 1
from skipnet.data import load_dataset
for s in ("train", "test"):
    d = load_dataset("imagefolder", "$DATA", s, workers=16)
    print(s, tuple(d.images.shape), flush=True)
EOF
echo "cache warm $(el)s"

root="--set data.root=$DATA"
if [ "$TINY" = 1 ]; then
  SPE="--set train.epochs=0.02 --set train.cosine_epochs=40"
  TAIL="--set train.epochs=0.02 --set train.cosine_epochs=40 --set train.cosine_start=30 --set train.fit_images=300"
  PLAINE=0.02; CHECKE=0.02; PAPER="--set train.epochs=0.02"
else
  SPE="--set train.epochs=30 --set train.cosine_epochs=40"
  TAIL="--set train.epochs=10 --set train.cosine_epochs=40 --set train.cosine_start=30"
  PLAINE=40; CHECKE=30; PAPER=""
fi
PREV="--set train.entropy=0.05 --set train.rate_loss=0 --set train.backbone_path=sampled --set train.rl_backbone=true --set train.distill=0"
PAPER_O="--set model.name=cifar_resnet38 --set data.name=imagefolder"

# --- smoke: every stage a few steps on this device; wave 2 runs beside the real phase-1 runs
S=/tmp/smoke; rm -rf $S; mkdir -p $S
smoke() {
  local name=$1; shift
  if $SK train "$@" $root --run-dir $S/$name --no-progress --set train.eval_every=0 > $S/$name.log 2>&1; then
    echo "smoke $name ok $(el)s: $(grep -h 'top-1' $S/$name.log | tail -1)"
  elif grep -q "non-finite loss" $S/$name.log; then echo "smoke $name ran (diverged on the barely trained net) $(el)s"
  else echo "SMOKE FAIL $name"; tail -25 $S/$name.log; return 1; fi
}
wave1() {
  smoke sp --recipe cifar10_cpu_sp --set train.epochs=0.01 --set train.cosine_epochs=40 & a=$!
  smoke plain --recipe cifar10_cpu_baseline --set train.epochs=0.01 & b=$!
  wait $a && wait $b
}
if ! wave1; then
  if [ $MPS = 1 ]; then echo quit | nvidia-cuda-mps-control; MPS=0; echo "MPS off, smoke again"; rm -rf $S/*; wave1 || exit 3
  else exit 3; fi
fi

PIDS=()
launch() {  # launch DIR NAME ARGS...: a finished run is left alone, an interrupted one resumed
  local dir=$1 name=$2; shift 2
  if [ -f $dir/$name/final.json ]; then echo "finished already: $name"; return; fi
  [ -f $dir/$name/checkpoints/last.pt ] && set -- --resume
  ( $SK train "$@" $([ "$1" = --resume ] || echo $root) --run-dir $dir/$name --no-progress >> $dir/$name.log 2>&1
    echo "$name rc=$? at $(el)s: $(grep -h 'top-1' $dir/$name.log | tail -1)" >> $R/done.txt ) &
  PIDS+=($!)
  echo "launched $name $(el)s"
}
launch $R sp --recipe cifar10_cpu_sp $SPE
for d in 14 20 26 32 38; do
  launch $R plain-resnet$d --recipe cifar10_cpu_baseline --set model.name=cifar_resnet$d --set train.epochs=$PLAINE
done
launch $X plain-resnet14-e30 --recipe cifar10_cpu_baseline --set model.name=cifar_resnet14 --set train.epochs=$CHECKE

I="--set train.init=$S/sp"
smoke hrl --recipe cifar10_cpu_hrl $I --set train.epochs=0.01 --set train.fit_images=500 & a=$!
smoke hrl-prev --recipe cifar10_cpu_hrl $I $PREV --set train.epochs=0.01 --set train.fit_images=500 & b=$!
smoke calibrate --recipe cifar10_cpu_calibrate $I --set train.epochs=0.01 & c=$!
smoke paper --recipe cifar10_hrl_paper $I $PAPER_O --set train.epochs=0.01 & d=$!
ok=1; for p in $a $b $c $d; do wait $p || ok=0; done
if [ $ok = 0 ]; then echo "stage-2 smoke failed: stopping"; kill -TERM "${PIDS[@]}" 2>/dev/null; sleep 5; exit 3; fi
echo "smoke done $(el)s"

status() {
  local line="[$(el)s]"
  for f in $R/*/metrics.jsonl $X/*/metrics.jsonl; do
    [ -f "$f" ] || continue
    local n; n=$(basename "$(dirname "$f")")
    local ep; ep=$(tail -1 "$f" | grep -o '"epoch": [0-9.]*' | head -1 | cut -d' ' -f2)
    [ -f "$(dirname "$f")/final.json" ] && ep=done
    line="$line $n:${ep:-?}"
  done
  echo "$line"
}
phase2=0
while :; do
  if [ $phase2 = 0 ] && [ -f $R/sp/final.json ]; then
    phase2=1
    I="--set train.init=$R/sp"
    for t in 0.5 0.65; do launch $R hrl-t$t --recipe cifar10_cpu_hrl $I $TAIL --set train.target_macs=$t; done
    launch $X hrl-t0.65-prev --recipe cifar10_cpu_hrl $I $TAIL $PREV --set train.target_macs=0.65
    for t in 0.5 0.65; do launch $R calibrate-t$t --recipe cifar10_cpu_calibrate $I $TAIL --set train.target_macs=$t; done
    launch $R hrl-paper --recipe cifar10_hrl_paper $I $PAPER_O $PAPER
  fi
  alive=0; for p in "${PIDS[@]}"; do kill -0 $p 2>/dev/null && alive=1; done
  if [ $alive = 0 ] && [ $phase2 = 1 ]; then echo "all runs finished $(el)s"; break; fi
  if [ $alive = 0 ] && [ ! -f $R/sp/final.json ]; then echo "SP ended without finishing"; tail -20 $R/sp.log; break; fi
  if [ "$(el)" -ge "$DEADLINE" ]; then
    echo "deadline $(el)s: stopping the runs (each checkpoints)"
    pkill -TERM -f "skipnet.cli train"; sleep 15; pkill -KILL -f "skipnet.cli train"; break
  fi
  status; sleep 15
done
status
cat $R/done.txt
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv 2>/dev/null
[ $MPS = 1 ] && echo quit | nvidia-cuda-mps-control
cd "$(dirname $R)" && tar cf - "$(basename $R)" "$(basename $X)" | split -b 15M -d - "$OUTD/runs.tar.part"
ls -l "$OUTD"; echo "packed $(el)s"
