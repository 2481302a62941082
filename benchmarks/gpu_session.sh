#!/usr/bin/env bash
# One device call's worth of GPU work, in priority order, for the device tool (see its README):
#   run(command="bash benchmarks/gpu_session.sh", carry=[".whl"], timeout_s=590)
# Writes logs and results under $OUT (at most 8 files come back: keep the list below short).
# Each step has its own time cap so a slow one (FLA autotuning) cannot starve the rest.
set -u
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then   # fla-core + einops wheels for the side-by-side benchmarks
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}. PYTHONUNBUFFERED=1 FLA_DISABLE_BACKEND_DISPATCH=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/device.txt"

# 1. every GPU test, one process per file (logs concatenated into one file)
timeout 150 make -s test-gpu GPU_LOG_DIR=/tmp/gpu-logs | tee "$OUT/gpu_tests.txt"
cat /tmp/gpu-logs/*.log > "$OUT/gpu_tests_full.log" 2>/dev/null
# 2. whole-model decode benchmark (issue 5): hybrid vs all-MLA, cache, TPOT, prefill
timeout 280 python3 -m kimi_linear.cli bench decode --out "$OUT/decode" 2>&1 | tail -40
# 3. chunked KDA side by side at the longest Figure-2 shape and a training shape (issue 3)
timeout 130 python3 -m kimi_linear.cli bench kda --shapes 1x65536x16,8x4096x32 \
  --providers ours,ours_fused,fla_kda,fla_kda_fused,flash --modes fwd,fwdbwd --out "$OUT/kda" 2>&1 | tail -30
