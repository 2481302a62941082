#!/usr/bin/env bash
# Issue 6: the trainer on 2 GPUs gives the same loss curve as on 1 GPU with the same global batch,
# for DDP and FSDP2 (fully_shard). ONE device call (well inside 500 s, Triton compile included):
#   run(command="bash benchmarks/multi_gpu_check.sh", kind="nvidia-h200-x2", timeout_s=560)
#
# The same small training four ways -- the real small hybrid preset with MoE (20m-moe: 8 layers,
# 3 KDA : 1 MLA, 8 experts top-2 + shared), the embedded stdlib corpus, byte tokenizer, seed 0,
# global batch BATCH rows x SEQ tokens, STEPS steps, eval only at the end, bf16 autocast:
#   one   : 1 GPU, plain python3, the whole batch in one forward;
#   ddp   : 2 GPUs, torchrun, --distributed ddp;
#   fsdp  : 2 GPUs, torchrun, --distributed fsdp (fully_shard per decoder layer + root);
#   accum : 1 GPU, --micro-batch-size BATCH/NPROC: the same per-forward shapes as the 2-GPU runs and
#           the same global batch, only summed in another order -> the floating-point noise floor.
# How the batch is split (kimi_linear/train/trainer.py): every rank reads the same BATCH rows from the
# same seeded stream and keeps rows [rank*BATCH/world, (rank+1)*BATCH/world); each micro-batch's mean
# loss is weighted by world * its scored tokens / the step's scored tokens, and DDP/FSDP average the
# gradients over ranks, so the update is the token mean over the global batch on any world size.
# Then benchmarks/compare_loss_curves.py prints per-step max/mean |loss difference| vs `one`, the
# same as a multiple of the accum noise floor, grad-norm differences, final val losses, tokens/s, and
# draws $OUT/loss_curves.png.
#
# CPU test (Gloo, tiny): DEVICE=cpu MODEL=tiny-moe SEQ=64 BATCH=4 STEPS=4 EXTRA="--threads 1" \
#   OUT=/tmp/mgc bash benchmarks/multi_gpu_check.sh
# Knobs: NPROC (2), DEVICE (auto), MODEL, SEQ (512), BATCH (32), STEPS (100), LR (1e-3), WARMUP (10),
# EXTRA (more `kimi-linear train` flags), DEADLINE_S (480), LAUNCH_ONE / LAUNCH_MULTI (the launchers).
# Results (6 files): $OUT/check.log, env.txt, compare.txt, compare.json, loss_curves.png and
# metrics.tar.gz (each run's metrics.jsonl and train_config.json).
set -u -o pipefail
OUT=${OUT:-multi-gpu-out}
mkdir -p "$OUT"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
# keep NVLink multicast off (device notes): a program using it can take the host's GPUs down
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
NPROC=${NPROC:-2}
DEVICE=${DEVICE:-auto}
MODEL=${MODEL:-20m-moe}
SEQ=${SEQ:-512}
BATCH=${BATCH:-32}
STEPS=${STEPS:-100}
LR=${LR:-1e-3}
WARMUP=${WARMUP:-10}
EXTRA=${EXTRA:-}
DEADLINE_S=${DEADLINE_S:-480}
LAUNCH_ONE=${LAUNCH_ONE:-python3 -m kimi_linear.cli train}
LAUNCH_MULTI=${LAUNCH_MULTI:-python3 -m torch.distributed.run --standalone --nproc-per-node $NPROC -m kimi_linear.cli train}
RUNS=$(mktemp -d /tmp/multi_gpu_check.XXXXXX)
LOG="$OUT/check.log"
: >"$LOG"
say() { echo "[$(date +%T) +${SECONDS}s] $*" | tee -a "$LOG"; }
cap() { local c=$(( DEADLINE_S - SECONDS - 30 )); [ "$1" -lt "$c" ] && c=$1; [ "$c" -lt 10 ] && c=10; echo "$c"; }

if [ $((BATCH % NPROC)) -ne 0 ]; then say "BATCH=$BATCH is not divisible by NPROC=$NPROC"; exit 2; fi
{
  nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  python3 -c 'import sys, torch, triton; print("python", sys.version.split()[0], "torch", torch.__version__, "triton",
triton.__version__, "cuda devices", torch.cuda.device_count(), "nccl", torch.cuda.nccl.version() if torch.cuda.is_available() else "-")'
  env | grep -E '^(NCCL|TORCH_SYMM|NVSHMEM)_' | sort
} 2>&1 | tee "$OUT/env.txt" | tee -a "$LOG"

# every run: the same config; only the launcher, the distributed mode and the micro-batch differ
ARGS=(--model "$MODEL" --data stdlib --tokenizer byte --seq-len "$SEQ" --batch-size "$BATCH" --steps "$STEPS"
      --lr "$LR" --warmup-steps "$WARMUP" --schedule cosine --seed 0 --eval-every 0 --eval-rows 64 --save-every 0
      --log-every 1 --no-progress --overwrite --device "$DEVICE" $EXTRA)

train() {  # name, time cap, launcher..., -- extra flags...
  local name=$1 limit; limit=$(cap "$2"); shift 2
  local launch=() ; while [ "$1" != "--" ]; do launch+=("$1"); shift; done; shift
  say "run $name (cap ${limit}s): ${launch[*]} ... $*"
  timeout -k 10 "$limit" "${launch[@]}" "${ARGS[@]}" --out-dir "$RUNS/$name" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  say "run $name exit $rc$([ "$rc" = 124 ] && echo ' (time cap)')"
}

train one 170 $LAUNCH_ONE -- --distributed none           # first: it also compiles the Triton kernels
train ddp 120 $LAUNCH_MULTI -- --distributed ddp
train fsdp 120 $LAUNCH_MULTI -- --distributed fsdp
train accum 100 $LAUNCH_ONE -- --distributed none --micro-batch-size $((BATCH / NPROC))

say "compare"
have=()
for n in one ddp fsdp; do [ -s "$RUNS/$n/metrics.jsonl" ] && have+=("$n"); done
if [ "${have[0]:-}" = one ] && [ ${#have[@]} -gt 1 ]; then
  labels=("1 GPU"); runs=("$RUNS/one")
  for n in "${have[@]:1}"; do runs+=("$RUNS/$n"); labels+=("$NPROC GPU $n"); done
  noise=(); [ -s "$RUNS/accum/metrics.jsonl" ] && noise=(--noise "$RUNS/accum" --noise-label "1 GPU accum x$NPROC")
  timeout -k 5 60 python3 benchmarks/compare_loss_curves.py "${runs[@]}" --labels "${labels[@]}" "${noise[@]}" \
    --png "$OUT/loss_curves.png" --json "$OUT/compare.json" 2>&1 | tee "$OUT/compare.txt" | tee -a "$LOG"
  say "compare exit $?"
else
  say "not enough finished runs to compare (have: ${have[*]:-none})"
fi
tar -czf "$OUT/metrics.tar.gz" -C "$RUNS" $(cd "$RUNS" && ls -d */metrics.jsonl */train_config.json 2>/dev/null)
say "done in ${SECONDS}s"
