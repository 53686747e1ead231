#!/usr/bin/env bash
# The whole GPU suite in one command, under 8 minutes on an H100/H200:
#   1. build the extension in place (no registry access on the device: --no-deps),
#   2. GPU tests first (kernels compiled for real, not interpreted),
#   3. per-op, packing and whole-step benchmarks (engine vs eager baseline, same process),
#   4. regenerate the README performance table.
# Output goes to $OUT (when set: the device tool fetches it) and into benchmarks/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
PY=${PYTHON:-python3}  # the device image's python3 is the one that holds torch
LOG="$OUT/run_device.log"
mkdir -p "$OUT" benchmarks/results
exec > >(tee -a "$LOG") 2>&1
t0=$(date +%s)
stamp() { echo "=== [$(( $(date +%s) - t0 )) s] $*"; }

stamp "device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"

stamp "build"
MAX_JOBS=${MAX_JOBS:-16} $PY -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 \
  || { echo "build failed, see build.log"; tail -30 "$OUT/build.log"; }
$PY -m tec_fast.info | tee "$OUT/info.txt"

stamp "GPU tests"
# Kernels compiled by Triton for the GPU (no interpreter), then the GPU-marked tests.
TRITON_INTERPRET=0 timeout 240 $PY -m pytest -q -x -m "gpu" tests \
  --junitxml="$OUT/gpu_tests.xml" 2>&1 | tail -40

stamp "op benchmarks"
timeout 120 $PY benchmarks/bench_ops.py --op all --device cuda --results-dir benchmarks/results 2>&1 | tail -40
stamp "packing benchmarks"
timeout 60 $PY benchmarks/bench_packing.py --results-dir benchmarks/results 2>&1 | tail -20
stamp "packed vs padded encoder"
timeout 90 $PY benchmarks/bench_packed.py --results-dir benchmarks/results 2>&1 | tail -8
stamp "step benchmarks"
timeout 180 $PY benchmarks/bench_step.py --preset vit_base --batch-sizes 64 128 256 --steps 10 \
  --results-dir benchmarks/results 2>&1 | tail -20

stamp "report"
$PY benchmarks/report.py --update-readme | tail -40
cp benchmarks/results/*.jsonl "$OUT"/ 2>/dev/null || true
cp README.md "$OUT"/README.generated.md
stamp "done"
