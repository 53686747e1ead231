#!/usr/bin/env bash
# The whole GPU suite in one command, inside a fixed time budget (default 480 s) on an H100/H200:
#   1. build the extension in place (no registry access on the device: --no-deps),
#   2. GPU tests (kernels compiled by Triton for the GPU, not interpreted),
#   3. whole-step (eager and CUDA-graph), step profile, GEMM-epilogue probe, per-op, packing and
#      packed-encoder benchmarks (engine vs eager baseline in the same process), most important first,
#   4. regenerate the README performance table.
# Each stage gets at most its own cap and never more than what is left of the budget, so a slow
# stage cannot starve the ones after it of a result. After every stage the results folder and the
# logs are packed into $OUT/device_results.tar.gz (the device tool returns at most 8 files).
#   BUDGET_S=480 bash benchmarks/run_device.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
PY=${PYTHON:-python3}  # the device image's python3 is the one that holds torch
BUDGET_S=${BUDGET_S:-480}
LOGS="$OUT/logs"
LOG="$LOGS/run_device.log"
mkdir -p "$LOGS" benchmarks/results
exec > >(tee -a "$LOG") 2>&1
t0=$(date +%s)
stamp() { echo "=== [$(( $(date +%s) - t0 )) s] $*"; }
# cap CAP: the seconds a stage may take, at most what is left of the budget (at least 5)
cap() { local left=$(( BUDGET_S - ($(date +%s) - t0) )); (( left < $1 )) && echo $(( left > 5 ? left : 5 )) || echo "$1"; }
pack() { tar -czf "$OUT/device_results.tar.gz" benchmarks/results "$LOGS" README.md 2>/dev/null || true; }

stamp "device"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || true
$PY -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"

stamp "build"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")}
MAX_JOBS=${MAX_JOBS:-16} timeout "$(cap 150)" $PY -m pip install --no-build-isolation --no-deps -e . > "$LOGS/build.log" 2>&1 \
  || { echo "build failed, see build.log"; tail -30 "$LOGS/build.log"; }
$PY -m tec_fast.info | tee "$LOGS/info.txt"
pack

stamp "GPU tests"
TRITON_INTERPRET=0 timeout "$(cap 150)" $PY -m pytest -q -p no:cacheprovider -m "gpu" tests \
  --junitxml="$LOGS/gpu_tests.xml" 2>&1 | tail -40
pack

stamp "step benchmarks"
timeout "$(cap 120)" $PY benchmarks/bench_step.py --preset vit_base --batch-sizes 64 128 256 --steps 10 \
  --cuda-graph --results-dir benchmarks/results 2>&1 | tail -20
pack
stamp "step profile (host vs GPU time, cProfile of the host side)"
timeout "$(cap 60)" $PY benchmarks/profile_step.py --batch 64 --python --top 30 --results-dir benchmarks/results \
  --trace "$LOGS" 2>&1 | tail -150
gzip -f "$LOGS"/trace_*.json 2>/dev/null
timeout "$(cap 40)" $PY benchmarks/profile_step.py --batch 256 --no-baseline --shapes --top 40 \
  --results-dir benchmarks/results 2>&1 | tail -100
pack
stamp "GEMM-epilogue probe (cuBLAS + GELU kernel vs a Triton GEMM with the GELU in its epilogue)"
timeout "$(cap 75)" $PY benchmarks/gemm_epilogue.py --results-dir benchmarks/results 2>&1 | tail -30
pack
stamp "weights cast once (engine) vs cast per weight at every step (engine_autocast)"
timeout "$(cap 60)" $PY benchmarks/bench_step.py --preset vit_base --batch-sizes 64 256 --steps 10 --no-baseline \
  --per-weight-casts --results-dir benchmarks/results 2>&1 | tail -8
pack
stamp "op benchmarks (eager calls, then CUDA-graph replays: GPU time alone)"
timeout "$(cap 90)" $PY benchmarks/bench_ops.py --op all --device cuda --results-dir benchmarks/results 2>&1 | tail -60
timeout "$(cap 90)" $PY benchmarks/bench_ops.py --op all --device cuda --cuda-graph \
  --results-dir benchmarks/results 2>&1 | tail -60
pack
stamp "packing benchmarks"
timeout "$(cap 40)" $PY benchmarks/bench_packing.py --results-dir benchmarks/results 2>&1 | tail -20
pack
stamp "packed vs padded encoder"
timeout "$(cap 60)" $PY benchmarks/bench_packed.py --results-dir benchmarks/results 2>&1 | tail -8
pack

stamp "report"
timeout 30 $PY benchmarks/report.py --update-readme | tail -40
pack
stamp "done"
