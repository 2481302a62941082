#!/usr/bin/env bash
# Per-kernel PDL trigger A/B (ops/pdl.py EARLY_TRIGGER): for each kernel key in KEYS and each context in
# CONTEXTS, the graph-replayed decode step with that kernel's trigger at exit (0) and right after its
# wait (1), alternating (decode_profile.py --ab, one process per pair). Needs a GPU. Key "*": every entry at
# once (all at exit against all early).
#   KEYS="fused_linear moe_down_one" CONTEXTS="4096 65536" OUT=out bash benchmarks/pdl_trigger_sweep.sh
set -uf  # -f: KEYS="*" is a table key, not a glob
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}.
for ctx in ${CONTEXTS:-4096}; do
  for key in ${KEYS:-fused_linear moe_gate_up_one moe_down_one route_split recurrent_kda rms_norm rms_norm_store latent_merge}; do
    echo "== context $ctx kernel $key"
    timeout ${CAP:-100} python3 benchmarks/decode_profile.py --context "$ctx" --top 0 --ab-rounds ${ROUNDS:-3} \
      --ab "kimi_linear.ops.pdl:EARLY_TRIGGER[$key]" 2>&1 | grep -E "graph-replayed step,"
  done
done | tee -a "$OUT/pdl_trigger_sweep.txt"
