"""Where a batch-1 decode step goes, against what each part must read: a bar chart from a profile.

Reads the per-kernel lines that ``benchmarks/decode_profile.py`` prints (one profile per context; e.g.
``results/decode/session13/ab_triton_absorb_h100.txt``), groups the kernels by the part of the step
they serve, and draws each group's GPU time beside its floor: the bytes it must move at batch 1 over
the copy rate. The bytes come from the decode benchmark's model itself (built on the meta device, no
memory), so the floors follow the geometry:

| group | kernels | bytes |
|---|---|---|
| experts | one-token gate_up / down (MoE layers and the dense first layer) | the chosen 8 + shared experts per MoE layer, the dense MLP |
| projections | ``fused_linear`` (inputs, low-rank up, outputs) | every attention-side matrix except ``kv_b`` |
| LM head | the one cuBLAS launch | the output embedding |
| router | split router | its weight (a few hundred KB) |
| KDA state + norms | recurrent kernel, gated norms (+ the final norm) | fp32 state read + write |
| MLA attention | latent split / merge, absorptions, cache write | ``kv_b`` + the latent cache at the context |

The times are the profile's: kernel durations of eager steps launched with programmatic dependent
launch, where a kernel placed early counts its wait for the one before; their sum is within ~1% of the
graph-replayed step, but a group can carry some of its neighbour's time (the merge at 128K).

    PYTHONPATH=. python benchmarks/plot_decode_breakdown.py PROFILE.txt --out breakdown.png [--tbps 3.0]
"""

from __future__ import annotations

import argparse
import re

import torch

PROFILE_HEAD = re.compile(r"^(\w+) B=(\d+) context=(\d+) .*GPU time per step ([\d.]+) ms")
KERNEL_LINE = re.compile(r"^\s+([\d.]+) us\s+x\s*(\d+)\s+(.+)$")
GROUPS = ("experts", "projections", "LM head", "router", "KDA state + norms", "MLA attention", "other")


def kernel_group(name: str, count: int) -> str:
    """The step part a kernel of the profile serves (module docstring)."""
    if name.startswith(("gate_up_one", "down_one")):
        return "experts"
    if name.startswith("fused_linear"):
        return "projections"
    if name.startswith("nvjet") and count == 1:
        return "LM head"
    if name.startswith("_route"):
        return "router"
    if name.startswith(("_recurrent_kda", "_rms_norm_fwd")):
        return "KDA state + norms"
    if name.startswith(("_latent_attn", "_absorb", "_rms_norm_store", "nvjet")):  # nvjet x 7: cuBLAS absorptions
        return "MLA attention"
    return "other"


def parse_profiles(text: str) -> dict[int, tuple[float, dict[str, float]]]:
    """``{context: (GPU ms per step, {group: us})}`` for every profile in a decode_profile output."""
    out: dict[int, tuple[float, dict[str, float]]] = {}
    current = None
    for line in text.splitlines():
        head = PROFILE_HEAD.match(line)
        if head:
            current = int(head.group(3))
            out[current] = (float(head.group(4)), {g: 0.0 for g in GROUPS})
            continue
        k = KERNEL_LINE.match(line)
        if k and current is not None:
            out[current][1][kernel_group(k.group(3), int(k.group(2)))] += float(k.group(1))
    if not out:
        raise SystemExit("no decode_profile output found (lines like 'hybrid B=1 context=4096 ... GPU time per step')")
    return out


def floor_bytes(layout: str, context: int) -> dict[str, float]:
    """Bytes each group must move per batch-1 step of the decode benchmark's model at ``context``."""
    from kimi_linear.bench.model_decode import bench_config
    from kimi_linear.model.modeling import KimiLinearForCausalLM

    cfg = bench_config(layout)
    with torch.device("meta"):
        model = KimiLinearForCausalLM(cfg, init=False)
    size = {n: p.numel() * 2 for n, p in model.named_parameters()}  # bf16
    out = {g: 0.0 for g in GROUPS}
    for name, nbytes in size.items():
        if ".block_sparse_moe.experts." in name:
            out["experts"] += nbytes * cfg.num_experts_per_token / cfg.num_experts  # the chosen experts only
        elif ".block_sparse_moe.shared_experts." in name or ".mlp." in name:
            out["experts"] += nbytes
        elif ".block_sparse_moe.gate." in name:
            out["router"] += nbytes
        elif name == "lm_head.weight":
            out["LM head"] += nbytes
        elif "kv_b_proj" in name:
            out["MLA attention"] += nbytes
        elif ".self_attn." in name and name.endswith("proj.weight") or "kv_a_proj" in name:
            out["projections"] += nbytes
    kda = sum(1 for m in model.modules() if type(m).__name__ == "KimiDeltaAttention")
    mla = sum(1 for m in model.modules() if type(m).__name__.endswith("LatentAttention"))
    K = cfg.kda_head_dim
    out["KDA state + norms"] += kda * cfg.kda_num_heads * K * K * 4 * 2
    out["MLA attention"] += mla * context * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 2
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("profile", help="a decode_profile.py output (text)")
    ap.add_argument("--out", default="decode_breakdown.png")
    ap.add_argument("--layout", default="hybrid")
    ap.add_argument("--tbps", type=float, default=3.0, help="copy rate for the floors (TB/s)")
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(args.profile) as f:
        profiles = parse_profiles(f.read())
    contexts = sorted(profiles)
    fig, axes = plt.subplots(1, len(contexts), figsize=(5.2 * len(contexts), 4.2), sharex=True, squeeze=False)
    for ax, ctx in zip(axes[0], contexts):
        total_ms, measured = profiles[ctx]
        floors = {g: b / (args.tbps * 1e12) * 1e6 for g, b in floor_bytes(args.layout, ctx).items()}
        groups = [g for g in GROUPS if measured[g] > 0 or floors[g] > 0]
        y = range(len(groups))
        ax.barh([i + 0.2 for i in y], [measured[g] for g in groups], height=0.4, label="measured (kernels)")
        ax.barh([i - 0.2 for i in y], [floors[g] for g in groups], height=0.4, label=f"bytes / {args.tbps} TB/s")
        for i, g in enumerate(groups):
            ax.text(measured[g], i + 0.2, f" {measured[g]:.0f}", va="center", fontsize=8)
        ax.set_yticks(list(y), groups)
        ax.invert_yaxis()
        floor_ms = sum(floors.values()) / 1e3
        ax.set_title(f"context {ctx:,}: {total_ms:.2f} ms of kernels, floor {floor_ms:.2f} ms", fontsize=10)
        ax.set_xlabel("us per step")
        print(f"context {ctx}: " + ", ".join(f"{g} {measured[g]:.0f} / {floors[g]:.0f} us" for g in groups)
              + f"; total {total_ms:.3f} ms of kernels, floor {floor_ms:.3f} ms")
    axes[0][0].legend(loc="lower right", fontsize=8)
    fig.suptitle(f"Batch-1 decode step by part ({args.layout}, {args.profile.rsplit('/', 1)[-1]})", fontsize=11)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
