#!/usr/bin/env bash
# The whole GPU suite in one command, inside a fixed time budget (default 450 s) on one H100/H200:
#   build the extension in place -> every op forward and forward+backward (then the measured
#   dispatch table) -> whole step at B = 32, 64, 128, 256 (engine, engine replayed from a CUDA
#   graph, eager baseline) -> GPU tests -> host overhead per step and per op -> packed vs padded
#   encoder at mask 0.6:0.9 -> step profile at B = 64 -> what time is left: op timings replayed
#   from graphs, GEMM-epilogue probe, per-weight casts, packing kernels -> README table.
#
# Every stage has its own cap and never more than what is left of the budget; a stage that
# cannot get its minimum is skipped (said so in the log), and a stage that fails or times out
# does not stop the ones after it. Rows go to benchmarks/results/<DEVICE>.jsonl (and the
# host-overhead / profile files beside it); each stage's output to
# benchmarks/results/device_logs/<UTC time>_<DEVICE>/<stage>.log, with stages.jsonl (one JSON
# line per stage: name, status, exit code, seconds, cap). After every stage the results folder
# is packed into $OUT/device_results.tar.gz (the device tool returns only what is under $OUT).
#
#   bash benchmarks/run_device.sh                      # on the GPU machine
#   BUDGET_S=300 bash benchmarks/run_device.sh         # a shorter budget
#   DRY_RUN=1 bash benchmarks/run_device.sh            # anywhere: the plan, each flag checked
#                                                      # against its script's --help, nothing run
#   bash benchmarks/run_device.sh --help               # this text
#
# Settings are environment variables, not arguments: BUDGET_S (seconds, a positive whole number;
# default 450), DRY_RUN (any non-empty value), PYTHON (default python3), OUT (where the packed
# results go; default a new temporary folder), LOGS (the stage logs' folder; a dry run's are under
# OUT), TAIL (log lines shown per stage; default 40).
# Exit status: 0 when every stage ran ok or was skipped for lack of budget; 1 after the last stage
# and the final pack when any stage failed, timed out or (dry run) named a flag its script lacks
# (the list is printed); 2 for a bad argument or setting, before anything runs.
set -uo pipefail
if [[ $# == 1 && ( $1 == -h || $1 == --help ) ]]; then  # the comment above, before anything runs
  awk 'NR > 1 { if (!/^#/) exit; sub(/^# ?/, ""); print }' "$0"
  exit 0
elif (( $# )); then
  echo "error: run_device.sh takes no arguments, got '$*' (settings are environment variables:" \
       "see bash $0 --help)" >&2
  exit 2
fi
BUDGET_S=${BUDGET_S:-450}  # 8 minutes less room for a timed-out stage's kill and the last pack
if [[ ! $BUDGET_S =~ ^[0-9]{1,9}$ ]] || (( 10#$BUDGET_S < 1 )); then
  echo "error: BUDGET_S must be a positive whole number of seconds, got '$BUDGET_S'" >&2
  exit 2
fi
BUDGET_S=$(( 10#$BUDGET_S ))  # 0450 is 450, not octal
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}  # the device image's python3 is the one that holds torch
DRY_RUN=${DRY_RUN:-}
OUT=${OUT:-$(mktemp -d)}
t0=$(date +%s)

if [[ -n $DRY_RUN ]]; then
  DEVICE=dry_run
else
  DEVICE=$($PY -c "import re, torch; print(re.sub(r'[^A-Za-z0-9_.-]+', '_', torch.cuda.get_device_name(0)))" 2>/dev/null \
           || echo no_cuda)
fi
RUN="$(date -u +%Y-%m-%d_%H%M%S)_${DEVICE}"
LOGS=${LOGS:-benchmarks/results/device_logs/$RUN}
[[ -n $DRY_RUN ]] && LOGS="$OUT/device_logs/$RUN"  # a dry run leaves the repository alone
mkdir -p "$LOGS" benchmarks/results
exec > >(tee -a "$LOGS/run_device.log") 2>&1

elapsed() { echo $(( $(date +%s) - t0 )); }
stamp() { echo "=== [$(elapsed) s] $*"; }
pack() {
  [[ -n $DRY_RUN ]] && return 0
  tar -czf "$OUT/device_results.tar.gz" benchmarks/results README.md docs/performance.md tec_fast/ops/measured \
    2>/dev/null || true
}
record() {  # record NAME STATUS RC SECONDS CAP
  printf '{"stage": "%s", "status": "%s", "rc": %s, "seconds": %s, "cap_s": %s, "at_s": %s}\n' \
    "$1" "$2" "$3" "$4" "$5" "$(elapsed)" >> "$LOGS/stages.jsonl"
}

# check_flags CMD...: every --flag of a python command exists in that script's --help (dry run)
check_flags() {
  local target=() args=() help
  if [[ $1 == "$PY" && $2 == "-m" ]]; then target=("$PY" -m "$3"); args=("${@:4}")
  elif [[ $1 == "$PY" ]]; then target=("$PY" "$2"); args=("${@:3}")
  elif [[ $1 == env ]]; then shift; while [[ $1 == *=* ]]; do shift; done; check_flags "$@"; return
  else return 0
  fi
  if [[ ${target[*]} == *"-m pytest" || ${target[*]} == *"-m pip" ]]; then return 0; fi  # not ours
  if ! help=$("${target[@]}" --help 2>&1); then
    echo "dry run: ${target[*]} --help failed:"; echo "$help" | tail -5; return 1
  fi
  local a bad=0
  for a in "${args[@]}"; do
    # a flag the parser declares: an option line of the help ("  --flag ..." or "  -x, --flag ..."),
    # not a mention in some help text's prose
    if [[ $a == --* ]] && ! grep -qE -- "^ {2,}(-[[:alnum:]], )?${a%%=*}([ =,]|$)" <<<"$help"; then
      echo "dry run: ${target[*]} has no flag ${a%%=*}"; bad=1
    fi
  done
  return $bad
}

# stage NAME CAP_S MIN_S CMD...: run CMD under min(CAP_S, budget left - RESERVE_S); skipped below MIN_S
RESERVE_S=0
BAD=()  # "name (status)" of every stage that failed, timed out or (dry run) named a missing flag
stage() {
  local name=$1 want=$2 min=$3; shift 3
  local left=$(( BUDGET_S - RESERVE_S - $(elapsed) ))
  local cap=$(( want < left ? want : left ))
  local log="$LOGS/${name// /_}.log"
  if (( cap < min )); then
    stamp "skip $name: ${left} s left of the budget, it needs at least ${min} s"
    record "$name" skipped null 0 "$cap"; return 0
  fi
  stamp "$name (cap ${cap} s): $*"
  if [[ -n $DRY_RUN ]]; then
    if check_flags "$@"; then record "$name" dry_ok 0 0 "$cap"
    else record "$name" dry_bad_flags 2 0 "$cap"; BAD+=("$name (dry_bad_flags)"); fi
    return 0
  fi
  local s rc
  s=$(date +%s)
  timeout --kill-after=10 "$cap" "$@" > "$log" 2>&1
  rc=$?
  tail -n "${TAIL:-40}" "$log"
  local status=ok
  (( rc == 124 || rc == 137 )) && status=timeout
  (( rc != 0 && rc != 124 && rc != 137 )) && status=failed
  stamp "$name: $status (exit $rc, $(( $(date +%s) - s )) s)"
  record "$name" "$status" "$rc" "$(( $(date +%s) - s ))" "$cap"
  [[ $status != ok ]] && BAD+=("$name ($status, exit $rc)")
  pack
}

stamp "device $DEVICE, budget ${BUDGET_S} s, logs in $LOGS"
if [[ -z $DRY_RUN ]]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || true
  $PY -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" || true
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null)}
fi
export MAX_JOBS=${MAX_JOBS:-16} TRITON_INTERPRET=0
R=benchmarks/results

# 1. the extension (no registry on the device: --no-deps), then what each op and attention would run
stage build 75 30 $PY -m pip install --no-build-isolation --no-deps -e .
stage info 10 5 $PY -m tec_fast.info

# 2. every op, forward and forward+backward, Triton against the reference (eager timing); then the
#    dispatch table auto reads on this GPU class, written from those rows (before the step, so that
#    the step's engine rows run what auto picks on this GPU from this run's measurements)
stage ops 55 25 $PY -m benchmarks.bench_ops --op all --device cuda --results-dir $R
stage dispatch_table 10 5 $PY -m benchmarks.dispatch_table

# 3. the step: B = 32..256, engine / engine replayed from a graph / eager, one process (MFU too)
stage step 100 40 $PY -m benchmarks.bench_step --preset vit_base --batch-sizes 32 64 128 256 --steps 10 \
  --cuda-graph --results-dir $R

# 4. correctness on the GPU: compiled kernels, graphs against eager, varlen, no host syncs (about
#    100 tests, each kernel compiled on first use; after the timings so that a slow compile cannot
#    cost them; one line per test, so a run cut short still says which passed). Two stages with
#    caps of their own: the ops' tests compiling every kernel cannot cost the engine's tests
stage gpu_tests_ops 90 30 $PY -m pytest -v -rfE -p no:cacheprovider -p no:randomly -m gpu \
  tests/ops/test_ops_gpu.py tests/ops/test_ops_validate.py tests/ops/test_packing.py \
  --junitxml="$LOGS/gpu_tests_ops.xml"
stage gpu_tests_engine 70 20 $PY -m pytest -v -rfE -p no:cacheprovider -p no:randomly -m gpu \
  tests/training tests/models tests/data tests/repo tests/bench --junitxml="$LOGS/gpu_tests_engine.xml"

# 5. host time per step (engine vs eager, with GPU-busy time) and per op call
stage host_overhead 35 15 $PY -m benchmarks.host_overhead --device cuda

# 6. packed vs padded at mask 0.6:0.9 (encoder + adapter, and the whole TEC step)
stage packed 40 20 $PY -m benchmarks.bench_packed --ratios 0.6:0.9 --batch-sizes 64 256 --whole-step \
  --results-dir $R

# 7. where a step's time goes at B = 64: wall vs GPU busy, launches, host functions
stage profile 25 15 $PY -m benchmarks.profile_step --batch 64 --python --top 30 --results-dir $R

# 8. with what is left, keeping the report's time
RESERVE_S=15
stage ops_graph 50 25 $PY -m benchmarks.bench_ops --op all --device cuda --cuda-graph --results-dir $R
stage gemm_epilogue 45 25 $PY -m benchmarks.gemm_epilogue --results-dir $R
stage per_weight_casts 40 25 $PY -m benchmarks.bench_step --preset vit_base --batch-sizes 64 256 --steps 10 \
  --no-baseline --per-weight-casts --results-dir $R
stage packing 25 15 $PY -m benchmarks.bench_packing --results-dir $R
# the loader with --decode gpu (nvjpeg; needs torchvision for the device's torch): img/s per GPU
stage loader_gpu_decode 40 20 $PY -m benchmarks.bench_loader --make-jpegs /tmp/tec_fast_jpegs --workers 8 \
  --jpegs 256 --repeats 1 --seconds 8 --images 200 --providers engine --gpu-decode --results $R/loader.jsonl
RESERVE_S=0
stage report 15 5 $PY -m benchmarks.report --update-readme

stamp "done: $(grep -cE '"status": "(dry_)?ok"' "$LOGS/stages.jsonl" 2>/dev/null) stages ok; stages.jsonl:"
cat "$LOGS/stages.jsonl"
pack
if (( ${#BAD[@]} )); then  # after every stage and the last pack: the results came back all the same
  bad=$(printf '%s; ' "${BAD[@]}")
  stamp "${#BAD[@]} stage(s) not ok: ${bad%; }"
  exit 1
fi
