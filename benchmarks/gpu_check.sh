#!/usr/bin/env bash
# Build, test and benchmark lifeiqa_fast on a GPU machine in a few minutes; write the report to OUTDIR.
#
#   benchmarks/gpu_check.sh OUTDIR
#
# For a lent GPU machine (16 cores, torch, CUDA, Triton, timm and pytest preinstalled, no network).
# OUTDIR receives gpu_check.md and gpu_check.json (the summary and the GPU validation records of every
# CUDA/Triton kernel whose tests passed), build.log, pytest.log, junit.xml, bench.md, bench.json,
# bench_model.md, bench_model.json, bench_scorer.md, bench_scorer.json.
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

# The head and the whole model as GPU users run them today: the reference (eager), auto, the composite
# ops eager and replayed as a CUDA graph, in fp32 and bf16 at batch 1 and 64. torch.compile rows (of the
# reference and of the composite model) are left out for time, as below.
log "benchmarking the head and the model (composite, CUDA graphs)"
start=$SECONDS
timeout 150 "$PY" benchmarks/run.py --device cuda --ops head,model --batch 1,64 --dtype fp32,bf16 \
  --impl eager,optimized,composite,composite-graph \
  --json "$OUTDIR/bench_model.json" --markdown "$OUTDIR/bench_model.md" 2>&1 | tail -20
log "head/model benchmark took $((SECONDS - start)) s"

# The whole model on the GPU: the official fp32 model (and under fp16 autocast) against the Scorer, at
# batch 1 and 64. torch.compile rows are left out here (a Swin-B compile takes about a minute per batch);
# run `benchmarks/run.py --device cuda --ops scorer` when there is time for them.
log "benchmarking the Scorer"
start=$SECONDS
timeout 150 "$PY" benchmarks/run.py --device cuda --ops scorer --batch 1,64 \
  --impl eager,autocast-fp16,scorer-fp32,scorer-bf16,scorer-fp16 \
  --json "$OUTDIR/bench_scorer.json" --markdown "$OUTDIR/bench_scorer.md" 2>&1 | tail -20
log "Scorer benchmark took $((SECONDS - start)) s"

"$PY" benchmarks/gpu_report.py "$OUTDIR"
rm -f "$OUTDIR/info.txt"  # folded into gpu_check.md
log "report: $OUTDIR/gpu_check.md"
