#!/usr/bin/env bash
# The pending GPU work, one device call per stage (each fits one 590 s call; see the device README):
#   run(command="bash benchmarks/gpu_session.sh kernels", carry=[".whl"], timeout_s=590)
#   run(command="bash benchmarks/gpu_session.sh tests", timeout_s=590)
#   run(command="bash benchmarks/gpu_session.sh decode", carry=[".whl"], timeout_s=590)
#   run(command="bash benchmarks/gpu_session.sh grid", carry=[".whl"], timeout_s=590)   # also: train
# (after the first call: carry=[".whl", ".triton-autotune.tar.gz"], see TRITON_CACHE_DIR below)
# Order for the next session (30 device minutes; the H100 counted 50% of its held time in sessions 22-30;
# a machine goes back after 30 minutes held, so a call must not run past that). Issue 5 (docs/decode.md,
# results/decode/README.md sessions 24-29): TPOT 2.80 / 2.85 / 3.00 / 3.18 ms at 4K / 16K / 64K / 128K against
# the 3 ms target (session 29's official run); the 64K step reads 2.994-3.002 across session 29's machines,
# at the line. Session 29 kept the one-pass split merge (-6 to -12 us) and the split kernel's first tile
# prefetched into L2 before its PDL wait (-6 to -14 us); the query absorption's own prefetch was neutral. Session 27 kept the MLA output projection's prefetch forked after the
# split kernel (-2 to -8 us) and removed two more attacks on the latent call's ~28 us fixed cost: each split's
# first keys prefetched into L2 before the query absorption (+16 us at 64K) and the merge + output absorption
# in one launch with a per-row counter (+15 us at 64K). GPU tests: the whole set takes more than two calls
# (session 26: run tests/ops/test_chunk_kda.py in parts, pytest -m gpu -k ...).
# The remaining excess is each launch's ramp and tail (~0.7 ms over the weights floor at 4K) and the latent
# calls' fixed cost at 64K+. Session 30: a persistent launch joined by a device-wide count does not remove the
# first (the MoE's two products in one launch: +0.38 ms per step at best, results/decode/session30/); what
# is left is tile-level dataflow (each tile waiting on the inputs it reads), not started; fusing launches
# within one kernel per operation lost five times (sessions 13, 24, 26, 27), and the KDA output norm moved
# into its neighbours lost 37-43 us (session 28). Session 28's probe (benchmarks/gluon_gemv_probe.py, ~10 s on
# the GPU): every GEMV implementation, a warp-specialised Gluon one included, sits 2-4 us above bytes / read
# rate per call. Gluon (triton.experimental.gluon) gives warp specialisation on Hopper in Triton 3.6.
# `ab` times a boolean switch or a launch table's 0 / 1 entry off / on (AB_FLAG=MODULE:FLAG or
# MODULE:TABLE[KEY], AB_CONTEXTS, AB_UPDATES); LATENT_ROUND / LATENT_SHAPES pick the latent sweep's list.
# Issue 7 (docs/kernels.md, v22-v23): ahead of FLA's bounded-gate path at every grid shape (eager
# layer-fused fwd+bwd 17.1 / 16.9 / 18.8 ms against 18.9 / 18.8 / 21.0 at B8 T4K H32 / B32 T2K H16 / B1 T64K
# H16; B1 T4K H16 graph-replayed 0.338 / 1.28 against 0.354 / 1.40), flash attention 1.99 fwd / 7.99
# fwd+bwd at B8 T4K H32. Per kernel at B8 T4K H32 fwd+bwd: decay products 5.13 (FLA bounded's intra
# backward 4.02), chunk gradients 4.85 + 0.54 (255 registers, one program per SM; TMA loads did not help,
# v23), state-gradient scan 1.34, epilogue 1.11, forward scan 1.09, products 0.97, diagonal gram 0.84,
# gram + inverse 0.70. Session 23 removed the forward's tiered diagonal (slower). Next: fewer registers /
# bytes in the chunk-gradient kernel (it waits on its 255 registers, not its loads). The on-chip forward
# (state in registers, 16-token chunks) was 1.9x slower in session 24 (docs/kernels.md v24).
# `train` (GRID_SHAPES=8x4096x32,32x2048x16,1x65536x16; FLA's bounded-gate path is among the default
# providers since session 19) took 310 s in session 19 with its autotuning cached (the committed archive
# now holds it). KDA_AB_PROFILE=1 adds per-kernel profiles to the kda-ab stage.
# Launch-table A/B of the whole call in GPU time:
# benchmarks/launch_ab_graph.py, stage `kda-ab` (KDA_AB_SHAPES, KDA_AB_VARIANTS, KDA_AB_MODES), e.g.
# KDA_AB_SHAPES="8x4096x32 1x4096x16" KDA_AB_VARIANTS="base chunk_grad.half_dots=0" KDA_AB_MODES=fwd,fwdbwd.
# Scans with num_stages=1 in bf16 faulted (illegal address) in session 18, and a fault ends the process;
# the kda-ab stage now checks each variant in a child process first (--preflight) and drops those.
# Short inputs are host-bound eager: benchmarks/host_overhead.py prints host vs GPU time per call;
# `--cuda-graph` times GPU time.
# Copy $OUT/triton-autotune.tar.gz back only when it is not empty (stages that run no FLA kernel write
# none).
# Kernel stage knobs: SWEEP="solve gram_diag ..." (kernels to sweep), SHAPES, PROFILES="--fla-profile
# --fused-profile", FUSED=1 (sweep the layer-fused setting), BENCH_SHAPES.
# Several stages may share one call: `bash benchmarks/gpu_session.sh tests profile`.
# Writes logs and results under $OUT (at most 8 files come back: keep the list short).
# Each step has its own time cap so a slow one (FLA autotuning) cannot starve the rest.
set -u
STAGES=${*:-kernels}
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then   # fla-core + einops wheels for the side-by-side benchmarks
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}. PYTHONUNBUFFERED=1 FLA_DISABLE_BACKEND_DISPATCH=1
# FLA caches its autotuning results in Triton's cache dir (FLA_CACHE_RESULTS, on by default), but each
# call starts on a fresh machine, so every call re-tuned for minutes (session 5: most of a 560 s grid
# call). The tuning results (*.autotune.json, small) go back in $OUT/triton-autotune.tar.gz; copy it to
# the repo root as .triton-autotune.tar.gz (git-ignored) and add it to `carry` to reuse them.
export TRITON_CACHE_DIR=/tmp/triton-cache TRITON_CACHE_AUTOTUNING=1
mkdir -p "$TRITON_CACHE_DIR"
# benchmarks/fla_autotune_h100.tar.gz (committed, session 16, the bounded-gate path added in session 19: FLA
# 0.6.0's kernels at K = V = 128, H 16 / 32,
# Triton 3.6.0, this H100) seeds the cache in a fresh checkout; a session's own archive goes on top
for archive in benchmarks/fla_autotune_h100.tar.gz .triton-autotune.tar.gz; do
  [ -f "$archive" ] && tar -xzf "$archive" -C "$TRITON_CACHE_DIR"
done
n_tuned=$(find "$TRITON_CACHE_DIR" -name '*.autotune.json' | wc -l)
[ "$n_tuned" -gt 0 ] && echo "reusing $n_tuned autotuning results"
save_autotune() {  # only when there is something to save (an empty archive copied back would erase the cache)
  if [ -n "$(find "$TRITON_CACHE_DIR" -name '*.autotune.json' -print -quit)" ]; then
    (cd "$TRITON_CACHE_DIR" && find . -name '*.autotune.json' | tar -czf "$OUT/triton-autotune.tar.gz" -T -) 2>/dev/null
  fi
}
trap save_autotune EXIT
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/device.txt"

for STAGE in $STAGES; do
case "$STAGE" in
kernels)
  # 1. a launch sweep of $SWEEP (default: the solve's warps / stages) at
  #    B=1 T=64K H=16; PROFILES="--fla-profile --fused-profile" adds per-kernel profiles
  #    COMPARE="1x8192x16 ..." then times ours (baseline and best settings) and FLA's exact path there
  timeout ${SWEEP_CAP:-300} python3 benchmarks/chunk_kda_sweep.py --shapes ${SHAPES:-1x65536x16} --kernels ${SWEEP:-solve} \
    ${PROFILES:-} ${FUSED:+--fused} ${COMPARE:+--compare $COMPARE} --budget ${SWEEP_BUDGET:-240} 2>&1 | tee "$OUT/sweep${FUSED:+_fused}.txt" | grep -v '^{'
  # 2. chunked KDA side by side: the Figure-2 end and a training shape (BENCH_SHAPES=none skips it)
  [ "${BENCH_SHAPES:-}" = none ] || timeout 220 python3 -m kimi_linear.cli bench kda --shapes ${BENCH_SHAPES:-1x65536x16,8x4096x32} \
    --providers ours,ours_fused,fla_kda,fla_kda_fused,flash --modes fwd,fwdbwd --out "$OUT/kda" 2>&1 | tail -30
  ;;
tests)
  # every GPU test, one process per file (a fault poisons its process's CUDA context)
  # GPU_TEST_FILES (a list of files) splits the set over calls: all of it no longer fits one (session 26)
  timeout ${TESTS_CAP:-560} make -s test-gpu GPU_LOG_DIR=/tmp/gpu-logs ${GPU_TEST_FILES:+GPU_TEST_FILES="$GPU_TEST_FILES"} \
    | tee "$OUT/gpu_tests.txt"
  cat /tmp/gpu-logs/*.log > "$OUT/gpu_tests_full.log" 2>/dev/null
  ;;
grid|train)
  # the side-by-side table of issues 3 / 7: Figure-2 grid (or the training shapes), ours vs FLA, exact
  # and layer-fused; FLA autotunes each new kernel configuration for minutes, so one stage per call
  shapes=${GRID_SHAPES:-$([ "$STAGE" = grid ] && echo fig2 || echo 8x4096x32,32x2048x16,1x4096x16,1x65536x16)}
  # BENCH_FLAGS="--cuda-graph": every provider timed replayed from a CUDA graph (GPU time of short inputs)
  timeout ${BENCH_CAP:-560} python3 -m kimi_linear.cli bench kda --shapes $shapes ${BENCH_FLAGS:-} \
    --providers ${PROVIDERS:-ours,fla_kda,ours_fused,fla_kda_fused,fla_kda_safe,flash} --modes fwd,fwdbwd --out "$OUT/kda" 2>&1 | tail -50
  ;;
kda-ab)
  # launch-table variants of the whole chunked-KDA call (layer-fused), replayed from a CUDA graph and
  # alternating over rounds: KDA_AB_SHAPES (BxTxH ...), KDA_AB_VARIANTS (base and ENTRY.KEY=INT[,...]);
  # a variant whose one-call check faults in a child process is dropped first (KDA_AB_PREFLIGHT=0: not);
  # KDA_AB_PROFILE=1: each variant's per-kernel times (one eager call) before the timed rounds
  args=""; for s in ${KDA_AB_SHAPES:-1x4096x16}; do args="$args --shape $s"; done
  [ "${KDA_AB_PREFLIGHT:-1}" = 1 ] && args="$args --preflight"
  [ "${KDA_AB_PROFILE:-0}" = 1 ] && args="$args --profile"  # per-kernel times of each variant first
  for v in ${KDA_AB_VARIANTS:-base state_fwd.output=1 gate.merge_l2norm=1,state_fwd.output=1}; do args="$args --variant $v"; done
  timeout ${KDA_AB_CAP:-200} python3 benchmarks/launch_ab_graph.py $args ${KDA_AB_MODES:+--modes $KDA_AB_MODES} 2>&1 \
    | tee "$OUT/kda_ab.txt" | grep -v '^{'
  ;;
gemv)
  # batch-1 decode products: fused_linear and the single-token MoE kernels against cuBLAS / the
  # tensor-core kernels, tile sweeps
  timeout 300 python3 benchmarks/decode_gemv_sweep.py --only ${GEMV_ONLY:-gemv,route,moe} 2>&1 | tee "$OUT/gemv_sweep.log" | grep -v "^{"
  ;;
profile)
  # per-kernel GPU time of one eager decode step (hybrid, 4K, batch 1) and the graph-replayed step
  # (PROFILE_ARGS: more arguments, e.g. --route-split-d 0 for the one-program router)
  timeout 200 python3 benchmarks/decode_profile.py --layout hybrid --context 4096 ${PROFILE_ARGS:-} 2>&1 | tail -45 \
    | tee -a "$OUT/decode_profile.txt"
  ;;
pdl)
  # programmatic dependent launch (ops/pdl.py): per-kernel profile with it on, then the graph-replayed
  # step with it off and on, alternating, at PDL_CONTEXTS (one process per context)
  for ctx in ${PDL_CONTEXTS:-4096 131072}; do
    timeout 200 python3 benchmarks/decode_profile.py --layout hybrid --context $ctx --top 16 --compare-pdl 3 2>&1 \
      | tail -25 | tee -a "$OUT/pdl_compare.txt"
  done
  ;;
prefill)
  # where a cached prefill's time goes (wall vs GPU kernels, top kernels and host ops), the forms before
  # session 11 (per-expert GEMM loop, PyTorch short conv) and after, hybrid and all-MLA, in one call
  for args in "--layout hybrid --before" "--layout hybrid" "--layout mla --before" "--layout mla"; do
    timeout 150 python3 benchmarks/prefill_profile.py $args --context ${PREFILL_CONTEXT:-4096} --top 14 2>&1 \
      | grep -v -i "warn" | tee -a "$OUT/prefill_profile.txt"
  done
  ;;
decode)
  # whole-model decode: hybrid vs all-MLA, cache, TPOT, prefill, transformers in the same run
  timeout 560 python3 -m kimi_linear.cli bench decode --out "$OUT/decode" 2>&1 | tail -60
  ;;
ncu)
  # Nsight Compute on one forward of ours and of FLA's exact path (NCU_ARGS: the shape, default T=64K;
  # --backward profiles one backward, --fused the layer-fused options; NCU_NAME: the output file name)
  S="--section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats --section SchedulerStats"
  timeout ${NCU_CAP:-280} ncu --clock-control none --profile-from-start off $S --section MemoryWorkloadAnalysis \
    python3 benchmarks/ncu_kda_fwd.py ${NCU_ARGS:---T 65536 --fla} > "$OUT/${NCU_NAME:-ncu_fwd}.txt" 2>&1
  grep -E "^  [_a-zA-Z].*\(|Duration|Registers Per|Achieved Occupancy|Issue Slots Busy|DRAM Throughput|Compute \(SM\) Throughput|Theoretical Occ|L1/TEX Hit|L2 Hit" "$OUT/${NCU_NAME:-ncu_fwd}.txt" | head -${NCU_LINES:-200}
  ;;
latent)
  # the absorbed-MLA decode call's launch settings and kernels (LATENT_ROUND: the sweep's candidate list),
  # correctness-gated against the fp32 reference, then the latent attention GPU tests
  timeout ${LATENT_CAP:-300} python3 benchmarks/latent_attention_sweep.py --round ${LATENT_ROUND:-4} ${LATENT_SHAPES:+--shapes $LATENT_SHAPES} \
    --budget ${LATENT_BUDGET:-220} 2>&1 | tee "$OUT/latent_sweep.txt"
  timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider tests/generation/test_latent_attention.py 2>&1 | tail -3 \
    | tee "$OUT/gpu_tests_latent.txt"
  ;;
ncu-latent)
  # Nsight Compute on one absorbed-MLA decode call (split kernel + merge) at NCU_CONTEXT keys
  S="--section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats --section SchedulerStats"
  timeout ${NCU_CAP:-200} ncu --profile-from-start off $S --section MemoryWorkloadAnalysis --section MemoryWorkloadAnalysis_Tables \
    python3 benchmarks/ncu_latent.py --context ${NCU_CONTEXT:-131072} ${NCU_TILES:+--tiles "$NCU_TILES"} > "$OUT/ncu_latent.txt" 2>&1
  tail -150 "$OUT/ncu_latent.txt"
  ;;
ab)
  # a decode A/B: AB_TESTS (pytest node ids / files, GPU-marked) first, then per context in AB_CONTEXTS the
  # per-kernel profile and the graph-replayed step with the boolean switch AB_FLAG (MODULE:FLAG) off and
  # on; AB_UPDATES: extra `--update MODULE:ATTR=JSON` arguments (one process per context)
  [ -z "${AB_TESTS:-}" ] || timeout ${AB_TESTS_CAP:-200} python3 -m pytest -q -m gpu -p no:cacheprovider $AB_TESTS 2>&1 \
    | tail -5 | tee -a "$OUT/gpu_tests_ab.txt"
  for ctx in ${AB_CONTEXTS:-4096 131072}; do
    eval "timeout ${AB_CAP:-200} python3 benchmarks/decode_profile.py --layout hybrid --context $ctx --top 16 \
      --ab '$AB_FLAG' ${AB_UPDATES:-}" 2>&1 | grep -v -i warn | tail -24 | tee -a "$OUT/ab.txt"
  done
  ;;
*)
  echo "stage must be kernels, tests, grid, train, kda-ab, gemv, profile, pdl, prefill, ncu, latent, ncu-latent, ab or decode, got $STAGE" >&2; exit 2 ;;
esac
done
