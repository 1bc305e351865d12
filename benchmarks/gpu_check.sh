#!/usr/bin/env bash
# Build, test and benchmark lifeiqa_fast on a GPU machine within a short GPU slot; write the report to OUTDIR.
#
#   benchmarks/gpu_check.sh OUTDIR            # on a GPU machine: at most GPU_CHECK_SECONDS (400) of wall time
#   GPU_CHECK_DRY_RUN=1 benchmarks/gpu_check.sh OUTDIR   # the same flow on a CPU machine (see README),
#                                                        # every limit x GPU_CHECK_SCALE (default 4 there)
#
# For a lent GPU machine (16 cores, torch, CUDA, Triton, timm and pytest preinstalled, no network). Every
# step has its own time limit, cut to what is left of the whole run's, and a failed or cut step does not
# stop the next: a partial run still leaves a report. The build is for the GPU present only (its compute
# capability); the tests are those marked `cuda` (each op's file apart, in parallel) and the golden test;
# the benchmarks are the quick rows (every op and impl at batches 1 and 64, the head and the whole model:
# eager, composite, composite replayed as a CUDA graph).
#
# OUTDIR receives gpu_check.md and gpu_check.json (the summary and the GPU validation records of every
# CUDA/Triton kernel whose tests passed), steps.txt (each step's exit status and seconds), build.log,
# info.txt, pytest_*.log, junit_*.xml, bench*.md, bench*.json.
# Commit the report under benchmarks/results/ and accept its validation records with
#   python benchmarks/gpu_report.py --accept benchmarks/results/<report>.json
set -uo pipefail
[[ $# -ge 1 && -n "$1" ]] || { echo "usage: benchmarks/gpu_check.sh OUTDIR" >&2; exit 2; }
OUTDIR="$(mkdir -p "$1" && cd "$1" && pwd)" || exit 2
# What an earlier run left there would be read as this run's (a cut test process writes no junit file).
rm -f "$OUTDIR"/junit_*.xml "$OUTDIR"/pytest_*.log "$OUTDIR"/bench*.md "$OUTDIR"/bench*.json "$OUTDIR"/info.txt \
  "$OUTDIR"/build.log "$OUTDIR"/gpu_check.md "$OUTDIR"/gpu_check.json
cd "$(dirname "$0")/.."
export MAX_JOBS="${MAX_JOBS:-$(nproc)}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
DRY_RUN="${GPU_CHECK_DRY_RUN:-0}"
SCALE="${GPU_CHECK_SCALE:-$([[ "$DRY_RUN" == 1 ]] && echo 4 || echo 1)}"  # step limits x SCALE (2 cores: x4)
DEADLINE=$((SECONDS + ${GPU_CHECK_SECONDS:-$((400 * SCALE))}))
log() { echo "[gpu_check $(date +%T)] $*"; }

# step NAME LIMIT_S COMMAND...: run with the smaller of LIMIT_S and the time left; record status and time.
step() {
  local name="$1" limit=$(($2 * SCALE)) left=$((DEADLINE - SECONDS)) start=$SECONDS rc
  shift 2
  ((limit > left)) && limit=$left
  if ((limit < 5)); then
    log "$name: skipped, the run's time is spent"
    echo "$name skipped 0" >>"$OUTDIR/steps.txt"
    return 0
  fi
  log "$name (at most ${limit} s)"
  timeout --kill-after=10 "$limit" bash -c '"$@"' "$name" "$@"  # bash: the step may be a function below
  rc=$?
  ((rc == 124 || rc == 137)) && log "$name: cut at ${limit} s"
  echo "$name $rc $((SECONDS - start))" >>"$OUTDIR/steps.txt"
  log "$name: exit $rc after $((SECONDS - start)) s"
  return $rc
}
: >"$OUTDIR/steps.txt"

if [[ "$DRY_RUN" == 1 ]]; then
  DEVICE=cpu ARCH="${TORCH_CUDA_ARCH_LIST:-9.0}" MODEL_BATCHES=1
  log "DRY RUN on $(nproc) CPU cores: the GPU steps run on cpu, the build for $ARCH"
else
  DEVICE=cuda MODEL_BATCHES=1,64
  ARCH="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' ')"
  log "GPU: $(nvidia-smi --query-gpu=name,driver_version,compute_cap --format=csv,noheader 2>/dev/null || echo none)"
  ARCH="${ARCH:-8.0;9.0}"
fi

# The kernels' tests, one process per op file (they share the GPU), then the rest of the CUDA tests and
# the golden test. junit per process, so that a cut one loses only its own results.
pytest_run() {  # pytest_run NAME ARGS...
  local name="$1"
  shift
  "$PY" -m pytest -q -p no:cacheprovider --junitxml="$OUTDIR/junit_$name.xml" "$@" >"$OUTDIR/pytest_$name.log" 2>&1
}
tests_in_parallel() {
  local pids=() rc=0 s
  for op in grid_pool gcn cross_attention moe; do
    pytest_run "$op" -m cuda "tests/test_$op.py" &
    pids+=($!)
  done
  pytest_run others -m cuda tests --ignore=tests/test_grid_pool.py --ignore=tests/test_gcn.py \
    --ignore=tests/test_cross_attention.py --ignore=tests/test_moe.py &
  pids+=($!)
  pytest_run golden tests/test_golden.py &
  pids+=($!)
  # The first failure's status; 5 (nothing collected: a file left out for a missing package) is none.
  for pid in "${pids[@]}"; do
    wait "$pid" || { s=$?; ((s == 5 || rc != 0)) || rc=$s; }
  done
  return $rc
}
# Built in place (setup.py build_ext --inplace, the tree on PYTHONPATH), not pip-installed: that needs
# neither network nor pip's build requirements (an older setuptools without `wheel` cannot pip-install
# with --no-build-isolation).
build() {
  TORCH_CUDA_ARCH_LIST="$ARCH" "$PY" setup.py build_ext --inplace >"$OUTDIR/build.log" 2>&1
}
info() { "$PY" -m lifeiqa_fast.info --build >"$OUTDIR/info.txt" 2>&1; }
export -f build info pytest_run tests_in_parallel
# The GPU machine has only torch, Triton, timm and pytest: test files needing other packages are left out
# (tests/conftest.py; the pytest logs name them).
export PY OUTDIR ARCH PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" LIFEIQA_FAST_TESTS_MISSING_OK=1
step build 240 build || tail -30 "$OUTDIR/build.log"
step info 60 info
head -40 "$OUTDIR/info.txt"

step tests 180 tests_in_parallel
tail -n 2 "$OUTDIR"/pytest_*.log

# Every op per implementation (torch.compile rows left out for time, as below).
step bench_ops 60 "$PY" benchmarks/run.py --device "$DEVICE" --ops grid_pool,gcn,cross_attention,moe --quick \
  --batch 1,64 --impl eager,composite,native,triton,native-grouped,native-dense,triton-grouped,triton-dense \
  --json "$OUTDIR/bench.json" --markdown "$OUTDIR/bench.md"
# The head and the whole model as GPU users run them today: the reference (eager), auto, and the
# composite ops eager and replayed as a CUDA graph, fp32 at batch 1 and 64 (torch.compile rows are
# left out for time: a compile takes about a minute).
step bench_model 90 "$PY" benchmarks/run.py --device "$DEVICE" --ops head,model --batch "$MODEL_BATCHES" --dtype fp32 \
  --impl eager,optimized,composite,composite-graph \
  --json "$OUTDIR/bench_model.json" --markdown "$OUTDIR/bench_model.md"

# The report, whatever came before: it reads what the steps left.
"$PY" benchmarks/gpu_report.py "$OUTDIR"
log "report: $OUTDIR/gpu_check.md ($((SECONDS)) s in all)"
