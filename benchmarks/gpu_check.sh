#!/usr/bin/env bash
# Build, test and benchmark lifeiqa_fast on a GPU machine in a few minutes; write the report to OUTDIR.
#
#   benchmarks/gpu_check.sh OUTDIR
#
# For a lent GPU machine (16 cores, torch, CUDA, Triton, timm and pytest preinstalled, no network).
# OUTDIR receives gpu_check.md and gpu_check.json (the summary and the GPU validation records of every
# CUDA/Triton kernel whose tests passed), build.log, pytest.log, junit.xml, bench.md, bench.json.
# Commit the report under benchmarks/results/ and accept its validation records with
#   python benchmarks/gpu_report.py --accept benchmarks/results/<report>.json
set -uo pipefail
OUTDIR="${1:?usage: benchmarks/gpu_check.sh OUTDIR}"
mkdir -p "$OUTDIR"
cd "$(dirname "$0")/.."
export MAX_JOBS="${MAX_JOBS:-$(nproc)}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
log() { echo "[gpu_check $(date +%T)] $*"; }

log "GPU: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null || echo none)"
log "building the extension with $MAX_JOBS jobs"
start=$SECONDS
if ! "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . >"$OUTDIR/build.log" 2>&1; then
  tail -30 "$OUTDIR/build.log"
  log "BUILD FAILED"
fi
log "build took $((SECONDS - start)) s"
"$PY" -m lifeiqa_fast.info | tee "$OUTDIR/info.txt"

log "running the tests (CUDA and Triton on the GPU, CPU alongside)"
start=$SECONDS
timeout 300 "$PY" -m pytest -q -p no:cacheprovider tests --junitxml="$OUTDIR/junit.xml" 2>&1 | tee "$OUTDIR/pytest.log" | tail -25
log "tests took $((SECONDS - start)) s"

log "benchmarking"
start=$SECONDS
timeout 180 "$PY" benchmarks/run.py --device cuda,cpu --quick --json "$OUTDIR/bench.json" --markdown "$OUTDIR/bench.md" 2>&1 | tail -40
log "benchmark took $((SECONDS - start)) s"

"$PY" benchmarks/gpu_report.py "$OUTDIR"
rm -f "$OUTDIR/info.txt"  # folded into gpu_check.md
log "report: $OUTDIR/gpu_check.md"
