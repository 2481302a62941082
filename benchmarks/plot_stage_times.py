"""Per-stage GPU time of one chunked-KDA call, ours (each kernel version) beside FLA, as stacked bars.

Reads the per-kernel profiles the launch sweep prints (``benchmarks/chunk_kda_sweep.py``: the
"baseline per-kernel ms" block, and with ``--fla-profile`` FLA's block), or the rows of a
``kimi-linear bench kda --profile`` JSONL, and groups kernels into stages.

    python benchmarks/plot_stage_times.py --out benchmarks/results/kda/session4/stages_h100.png \\
        "v4=benchmarks/results/kda/sweep/sweep_v6_variants_h100.txt:baseline" \\
        "FLA 0.6.0=benchmarks/results/kda/sweep/sweep_v7_profiles_h100.txt:FLA"

Each bar is ``label=file:block`` with block ``baseline``, ``fused`` or ``FLA``; ``+best`` after the
block replaces each swept kernel's time by its best candidate from the same file. A bar from a
``bench kda --profile`` JSONL is ``label=file.jsonl:provider@BxTxH@mode``, e.g.
``"FLA bounded=kda.jsonl:fla_kda_safe@8x4096x32@fwd"``; from a launch-table A/B log (``launch_ab_graph.py
--profile``) ``label=file.txt:variant@BxTxH@mode``, e.g. ``"v21=kda_ab.txt:base@8x4096x32@fwd"``.
"""

from __future__ import annotations

import argparse
import json
import re

# kernel-name fragments -> stage (ours and FLA's names)
# (first match wins; the merged launches -- gate cumsum with the q/k rstd or norm, gate gradients with the
# norm's backward -- count as the gate's)
STAGES = [
    ("gate / cumsum (+ q/k norm where merged)", ("_gate_cumsum_kernel", "_gate_grad_kernel", "chunk_local_cumsum",
                                                 "_prologue_kernel", "_epilogue_kernel", "kda_gate_")),
    ("fwd: intra-chunk (grams, inverse)", ("_gram_kernel", "_gram_diag_kernel", "_solve_kernel", "_inverse_kernel",
                                           "intra_token_parallel", "inter_solve_fused", "intra_sub_chunk")),
    ("fwd: products (w, u)", ("_wu_kernel", "recompute_w_u")),
    ("fwd: state scan", ("_state_fwd_kernel", "fwd_kernel_h")),
    ("fwd: output", ("_output_kernel", "chunk_gla_fwd_kernel_o")),
    ("bwd: state-gradient scan", ("_state_bwd_kernel", "_dw_local_kernel", "bwd_kernel_dhu")),
    ("bwd: chunk grads", ("_chunk_grad_kernel", "_chunk_grad_finish_kernel", "wy_dqkg_fused", "bwd_kernel_dAv")),
    ("bwd: intra-chunk decay products", ("_decay_grad_kernel", "bwd_kernel_intra")),
    ("l2norm", ("_l2norm", "l2norm_", "_rstd_kernel")),
]
OTHER = "torch elementwise (casts, grad accumulation; partly the profiling harness)"


def read_block(path: str, block: str) -> dict[str, float]:
    """Kernel -> ms from one profile block of a sweep log (names as printed, possibly truncated)."""
    heads = {"baseline": "baseline per-kernel ms", "fused": "fused path per-kernel ms", "FLA": "FLA exact path per-kernel ms"}
    times: dict[str, float] = {}
    inside = False
    for line in open(path):
        if line.startswith("=="):
            inside = heads[block] in line
            continue
        m = re.match(r"\s+([0-9.]+)\s{2}(\S.*)$", line)
        if inside and m:
            times[m.group(2).strip()] = float(m.group(1))
        elif inside and line.strip() and not m:
            inside = False
    return times


def read_profile_jsonl(path: str, key: str) -> dict[str, float]:
    """Kernel -> ms of one row of a ``bench kda --profile`` JSONL, ``key`` = ``provider@BxTxH@mode``."""
    provider, shape, mode = key.split("@")
    B, T, H = (int(x) for x in shape.split("x"))
    for line in open(path):
        rec = json.loads(line)
        sh = rec.get("shape", {})
        if (rec.get("provider"), rec.get("mode"), sh.get("B"), sh.get("T"), sh.get("H")) == (provider, mode, B, T, H):
            kernels = rec.get("extra", {}).get("kernels_ms")
            if not kernels:
                raise ValueError(f"{path}: the row {key} has no per-kernel times (run bench kda --profile)")
            return kernels
    raise ValueError(f"{path}: no row {key}")


def read_ab_table(path: str, key: str) -> dict[str, float]:
    """Kernel -> ms of one variant's column in a launch-table A/B log's per-kernel table
    (``benchmarks/launch_ab_graph.py --profile``), ``key`` = ``variant@BxTxH@mode``. The table's column
    headers are cut to 22 characters, so the column is found from the order in which the log's JSON rows
    name the variants (the order of the run's ``--variant`` arguments)."""
    variant, shape, mode = key.split("@")
    order: list[str] = []
    for line in open(path):
        if line.startswith("{"):
            v = json.loads(line).get("variant")
            if v is not None and v not in order:
                order.append(v)
    if variant not in order:
        raise ValueError(f"{path}: no variant {variant!r} (the log has {order})")
    col = order.index(variant)
    head = f"kernel ({'-'.join(f'{c}{x}' for c, x in zip('BTH', shape.split('x')))} {mode}, ms)"
    times: dict[str, float] = {}
    inside = False
    for line in open(path):
        if line.startswith(head):
            inside = True
            continue
        if inside:
            cells = line.split()
            if not cells or cells[0] == "total":
                return times
            ms = float(cells[1 + col])
            if ms > 0:
                times[cells[0]] = ms
    raise ValueError(f"{path}: no per-kernel table {head!r}")


def best_per_kernel(path: str) -> dict[str, float]:
    """Swept kernel -> its best candidate's ms (the '-> name: best {...} X ms' lines)."""
    names = {"decay_grad": "_decay_grad_kernel", "gram_diag": "_gram_diag_kernel", "gram": "_gram_kernel",
             "solve": "_solve_kernel", "chunk_grad": "_chunk_grad_kernel", "state_fwd": "_state_fwd_kernel",
             "state_bwd": "_state_bwd_kernel", "output": "_output_kernel"}
    out = {}
    for line in open(path):
        m = re.match(r"\s+-> (\w+): best .* ([0-9.]+) ms \(baseline", line)
        if m:
            out[names[m.group(1)]] = float(m.group(2))
    return out


def stages(times: dict[str, float]) -> dict[str, float]:
    out = {name: 0.0 for name, _ in STAGES}
    out[OTHER] = 0.0
    for kernel, ms in times.items():
        for name, frags in STAGES:
            if any(f in kernel for f in frags):
                out[name] += ms
                break
        else:
            out[OTHER] += ms
    return out


def default_titles(bars: list[str]) -> tuple[str, str]:
    """(title, x label) naming the one shape and mode that every ``...@BxTxH@mode`` bar names; the sweep
    files' shape (B=1 T=65536 H=16, fwd+bwd) where bars name none; refused where bars name different ones
    (a picture must not put two shapes under one title)."""
    specs = {b.rsplit(":", 1)[1].split("@", 1)[1] for b in bars if b.rsplit(":", 1)[1].count("@") == 2}
    if len(specs) > 1:
        raise SystemExit(f"bars name different shapes / modes ({sorted(specs)}): plot them apart or pass --title")
    shape, mode = specs.pop().split("@") if specs else ("1x65536x16", "fwdbwd")
    B, T, H = shape.split("x")
    what = {"fwd": "fwd", "fwdbwd": "fwd+bwd"}.get(mode, mode)
    return (f"chunked KDA {what} per stage, B={B} T={T} H={H} K=V=128 bf16, H100",
            f"GPU time per {what} (ms, torch.profiler)")


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ap = argparse.ArgumentParser()
    ap.add_argument("bars", nargs="+", help="label=file:block[+best], label=file.jsonl:provider@BxTxH@mode, or "
                    "label=ab_log.txt:variant@BxTxH@mode")
    ap.add_argument("--out", required=True)
    ap.add_argument("--title", default=None,
                    help="default: from the bars' @BxTxH@mode when they all name the same one, else the sweep's "
                    "B=1 T=65536 H=16 fwd+bwd")
    ap.add_argument("--xlabel", default=None, help="default: GPU time per call of the title's mode")
    args = ap.parse_args()
    title, xlabel = default_titles(args.bars)
    args.title = args.title or title
    args.xlabel = args.xlabel or xlabel
    labels, rows = [], []
    for spec in args.bars:
        label, rest = spec.split("=", 1)
        path, block = rest.rsplit(":", 1)
        if path.endswith(".jsonl"):
            times = read_profile_jsonl(path, block)
        elif block.count("@") == 2:
            times = read_ab_table(path, block)
        else:
            times = read_block(path, block.removesuffix("+best"))
            if block.endswith("+best"):
                times.update(best_per_kernel(path))
        labels.append(label)
        rows.append(stages(times))
        print(f"{label:28s} " + "  ".join(f"{k.split(':')[-1].strip()[:14]} {v:.2f}" for k, v in rows[-1].items()))
    names = [n for n, _ in STAGES] + [OTHER]
    fig, ax = plt.subplots(figsize=(11, 0.8 * len(labels) + 2.5))
    left = [0.0] * len(labels)
    colors = plt.get_cmap("tab10").colors
    for i, name in enumerate(names):
        vals = [r[name] for r in rows]
        ax.barh(labels, vals, left=left, color=colors[i % 10], label=name, edgecolor="white")
        left = [a + b for a, b in zip(left, vals)]
    for y, total in enumerate(left):
        ax.text(total + 0.01 * max(left), y, f"{total:.2f} ms", va="center")
    ax.invert_yaxis()
    ax.set_xlabel(args.xlabel)
    ax.set_title(args.title, fontsize=10)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=3)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)


if __name__ == "__main__":
    main()
