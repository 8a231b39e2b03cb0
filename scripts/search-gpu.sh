#!/bin/bash
# Two job lists of `skipnet train` runs trained at once on one GPU (scripts/train_batch.py), as on 2026-12-04
# (one H200 lent for 15 minutes; docs/RESULTS.md): scripts/jobs/fm-routing-2026-12-04.jobs (Fashion-MNIST, 4
# epochs: deeper SkipNets and HRL-recipe variants against the plain line) and scripts/jobs/c10-recipe-2026-12-04.jobs
# (CIFAR-10, plain ResNet-38 recipe variants at 40 epochs); the CIFAR-10 trade-off runs of the 12:13 lease are
# scripts/jobs/c10-tradeoff-2026-12-04.jobs. Smoke-tests the stages for a few steps first (exit 3 when one
# fails, after a second try without MPS), stops every run at DEADLINE seconds from the start (each writes a
# checkpoint: rerun to resume them), drops the optimiser state from finished runs' checkpoints, and packs the run
# folders (the plain Fashion-MNIST runs without weights) into $OUT in 15 MB parts. From the repository root:
#   OUT=/tmp/out DEADLINE=480 bash scripts/search-gpu.sh
# JOBS_FM / JOBS_C10: other job lists ("none": leave that dataset out); RUNS_FROM: a folder of earlier run folders
# (fm/NAME, c10/NAME, e.g. an SP run carried to the lent machine) copied in first; files already in RUNS are
# not overwritten. The smoke tests cover fashion_mnist_sp/hrl and every CIFAR-10 stage (plain, SP, HRL with the
# settings of now and of before 2026-12-04, calibrate, the paper's HRL; the four from SP at once); the ACT/SACT/SDV
# recipes are not smoke-tested.
# Data: CIFAR-10 from ../shared/datasets/cifar10-jpeg or DATA_ARCHIVE (a tar.xz of its train/ and test/ folders of
# JPEG files); Fashion-MNIST from FM_ROOT (default /usr/share/datasets/fashion-mnist, the Debian package's files).
set -u
T0=$(date +%s)
el() { echo $(( $(date +%s) - T0 )); }
DEADLINE=${DEADLINE:-480}
TINY=${TINY:-0}  # 1: every run a few steps (a dry run of this script on a CPU)
T=""; [ "$TINY" = 1 ] && T="--set train.epochs=0.003 --set train.fit_images=200 --set train.eval_every=0"
PY=${PY:-python3}
R=${RUNS:-$PWD/runs/search}  # inside the repository (ignored): on the lent machine a later call finds it, /tmp it does not
OUTD=${OUT:-/tmp/gpu-out}
C10=../shared/datasets/cifar10-jpeg
JF=${JOBS_FM:-scripts/jobs/fm-routing-2026-12-04.jobs}
JC=${JOBS_C10:-scripts/jobs/c10-recipe-2026-12-04.jobs}
FM=${FM_ROOT:-/usr/share/datasets/fashion-mnist}
[ "$JF" = none ] || FM=$(cd "$FM" && pwd) || exit 1
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
mkdir -p "$R" "$OUTD" "$C10"
OUTD=$(cd "$OUTD" && pwd)
[ -n "${RUNS_FROM:-}" ] && cp -rn "$RUNS_FROM/." "$R/"
C10=$(cd "$C10" && pwd)
if [ "$JC" != none ] && [ ! -e "$C10/train.zip" ] && [ ! -d "$C10/train" ]; then
  tar xJf "${DATA_ARCHIVE:?no CIFAR-10 in $C10}" -C "$C10" || exit 1; fi
echo "data ready $(el)s"
nvidia-smi --query-gpu=name,memory.used,driver_version --format=csv 2>/dev/null
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
MPS=0
if command -v nvidia-cuda-mps-control >/dev/null && nvidia-cuda-mps-control -d; then
  if $PY -c "import torch; torch.zeros(1, device='cuda')"; then MPS=1; echo "MPS on"; else echo quit | nvidia-cuda-mps-control; fi
fi
[ "$JC" = none ] || $PY - <<EOF || exit 1
from skipnet.data import load_dataset
for s in ("train", "test"):
    print(s, tuple(load_dataset("imagefolder", "$C10", s, workers=16).images.shape), flush=True)
EOF
[ "$JC" = none ] || echo "CIFAR-10 cache warm $(el)s"

S=$R/smoke; rm -rf $S; mkdir -p $S
SK="$PY -m skipnet.cli train --no-progress --set train.eval_every=0"
smoke() { local name=$1; shift
  if $SK "$@" --run-dir $S/$name > $S/$name.log 2>&1; then echo "smoke $name ok $(el)s"
  elif grep -q "non-finite loss" $S/$name.log; then echo "smoke $name ran (diverged on the barely trained net) $(el)s"
  else echo "SMOKE FAIL $name"; tail -25 $S/$name.log; return 1; fi; }
trained() { [ -f $S/$1/checkpoints/last.pt ] || { echo "SMOKE FAIL $1: no checkpoint for the stages from it"; return 1; }; }
waitall() { local ok=0 p; for p in "$@"; do wait $p || ok=1; done; return $ok; }
fm_smoke() {
  smoke sp --recipe fashion_mnist_sp --set model.name=cifar_resnet32 --set data.root=$FM --set train.epochs=0.02 &&
    trained sp && smoke hrl --recipe fashion_mnist_hrl --set model.name=cifar_resnet32 --set data.root=$FM \
      --set train.init=$S/sp --set train.epochs=0.02 --set train.fit_images=500
}
c10_smoke() {  # the plain recipe beside SP, then the four kinds of stage the job lists start from SP, at once
  local CR="--set data.root=$C10" CI="--set train.init=$S/c10sp --set train.epochs=0.01" p q=()
  smoke c10 --recipe cifar10_cpu_baseline $CR --set train.epochs=0.01 & p=$!
  smoke c10sp --recipe cifar10_cpu_sp $CR --set train.epochs=0.01 && trained c10sp || { wait $p; return 1; }
  smoke c10hrl --recipe cifar10_cpu_hrl $CR $CI --set train.fit_images=500 & q+=($!)
  smoke c10prev --recipe cifar10_cpu_hrl $CR $CI --set train.fit_images=500 --set train.entropy=0.05 \
    --set train.rate_loss=0 --set train.backbone_path=sampled --set train.rl_backbone=true --set train.distill=0 & q+=($!)
  smoke c10cal --recipe cifar10_cpu_calibrate $CR $CI & q+=($!)
  smoke c10paper --recipe cifar10_hrl_paper $CR $CI --set model.name=cifar_resnet38 --set data.name=imagefolder & q+=($!)
  waitall $p "${q[@]}"
}
smoke_all() {
  local a="" b=""
  [ "$JF" != none ] && { fm_smoke & a=$!; }
  [ "$JC" != none ] && { c10_smoke & b=$!; }
  waitall $a $b && return 0
  pkill -f "skipnet.cli train.*--run-dir $S/"; sleep 2; return 1  # runs of the other list still going
}
if ! smoke_all; then  # as on the first lease: MPS is the likeliest culprit on a new machine; once more without it
  [ $MPS = 1 ] || exit 3
  echo quit | nvidia-cuda-mps-control; MPS=0; echo "MPS off, smoke again"; rm -rf "${S:?}"/*; smoke_all || exit 3
fi
echo "smoke done $(el)s"

left=$(( DEADLINE - $(el) ))
a=""; b=""; touch $R/c10.txt
[ "$JC" != none ] && { $PY scripts/train_batch.py --jobs $JC --runs $R/c10 --parallel ${PC:-6} --deadline $left \
  --extra "--set data.root=$C10 $T" > $R/c10.txt 2>&1 & a=$!; }
[ "$JF" != none ] && { $PY scripts/train_batch.py --jobs $JF --runs $R/fm --parallel ${PF:-9} --deadline $left \
  --extra "--set data.root=$FM $T" 2>&1 | tee $R/fm.txt & b=$!; }
while { [ -n "$a" ] && kill -0 $a 2>/dev/null; } || { [ -n "$b" ] && kill -0 $b 2>/dev/null; }; do
  sleep 30; echo "[$(el)s] c10: $(grep -c rc= $R/c10.txt) ended"; done
cat $R/c10.txt
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv 2>/dev/null
[ $MPS = 1 ] && echo quit | nvidia-cuda-mps-control
$PY - "$R" <<'EOF'
import sys, pathlib, torch
for f in pathlib.Path(sys.argv[1]).glob("*/*/final.json"):
    ck = f.parent / "checkpoints" / "last.pt"
    if ck.exists():
        p = torch.load(ck, map_location="cpu", weights_only=False)
        p["optimizers"] = []
        torch.save(p, ck)
EOF
for d in "$R"/fm/plain*/; do [ -f "$d/final.json" ] && rm -rf "$d/checkpoints"; done  # finished ones only
rm -rf "$S"
cd "$R" && tar cf - . | split -b 15M -d - "$OUTD/runs.tar.part"
ls -l "$OUTD"; echo "packed $(el)s"
