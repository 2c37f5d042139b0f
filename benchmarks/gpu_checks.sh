#!/usr/bin/env bash
# Issue 23's GPU checks in one call on a lent device machine (about 5 minutes on an H200), prepared so
# that a session which is lent one spends its device time measuring, not writing scripts.
#
# On this machine, first:   mkdir -p gpu_data && cp -r ../shared/data/mnist gpu_data/
# then the device call:     run(command="bash benchmarks/gpu_checks.sh", carry=["gpu_data"], timeout_s=480)
# Results land in $OUT (the device's returned folder), or benchmarks/results without one.
# PYTHON=.venv/bin/python SPARSE_ENSEMBLES_RESULTS=/tmp/x DEVICE=cpu HIDDEN=64 QUICK=1 bash benchmarks/gpu_checks.sh
# runs the same steps here, small, to check the script (tests/test_benchmarks_quick.py does).
set -u
export PYTHONPATH=$PWD
export SPARSE_ENSEMBLES_DATA=${SPARSE_ENSEMBLES_DATA:-$PWD/gpu_data}
export SPARSE_ENSEMBLES_RESULTS=${OUT:-${SPARSE_ENSEMBLES_RESULTS:-$PWD/benchmarks/results}}
DEVICE=${DEVICE:-cuda}
HIDDEN=${HIDDEN:-650}
QUICK=${QUICK:-0}
PY=${PYTHON:-python}
failed=0
step() {  # step NAME SECONDS COMMAND...: run it under a time limit; a failure does not stop the rest
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s)"
  local t0=$SECONDS
  timeout "$limit" "$@" || { echo "!! $name failed or ran past ${limit}s"; failed=$((failed + 1)); }
  echo "== $name: $((SECONDS - t0)) s"
}
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
if [ "$DEVICE" = cuda ]; then
  step "CUDA tests" 150 $PY -m pytest -q -x -p no:cacheprovider -k cuda tests
fi
steps=20; rounds=7
[ "$QUICK" = 1 ] && { steps=3; rounds=2; }
step "operations, CUDA kernels and host time per step" 120 $PY benchmarks/step_kernels.py --device "$DEVICE" --hidden "$HIDDEN" --rounds $rounds
step "SGLD vs SGD, LSTM $HIDDEN" 120 $PY benchmarks/lstm_sampler_overhead.py --hidden "$HIDDEN" --device "$DEVICE" --steps $steps --rounds $rounds
step "vectorised chains (M = 4, 18)" 120 $PY benchmarks/scaling.py --device "$DEVICE" --threads 1 --rounds $((rounds > 5 ? 5 : rounds)) --steps 10
if [ "$QUICK" = 1 ]; then
  echo "(QUICK: sampler_overhead.py left out; it takes minutes on a CPU)"
else
  step "SGLD / SGHMC vs SGD, MLP" 200 $PY benchmarks/sampler_overhead.py --quick --device "$DEVICE"
fi
echo "gpu_checks: $failed step(s) failed"
exit $failed
