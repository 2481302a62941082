"""``kimi-linear demo``: run the reference KDA both ways on random input and show they agree."""

from __future__ import annotations

import argparse
import time


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="reference KDA demo: chunkwise == recurrent on random input")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=300)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from kimi_linear.ops.kda import KDAFusion, chunk_kda_ref, recurrent_kda_ref

    if min(args.batch, args.seq_len, args.heads, args.head_dim) < 1:
        raise SystemExit("demo: --batch, --seq-len, --heads and --head-dim must be >= 1")
    gen = torch.Generator().manual_seed(args.seed)
    B, T, H, D = args.batch, args.seq_len, args.heads, args.head_dim
    q, k, v = (torch.randn(B, T, H, D, generator=gen, dtype=torch.float64) for _ in range(3))
    g_raw = torch.randn(B, T, H, D, generator=gen, dtype=torch.float64)
    beta_logits = torch.randn(B, T, H, generator=gen, dtype=torch.float64)
    A_log = torch.log(torch.linspace(1, 16, H, dtype=torch.float64))
    dt_bias = torch.randn(H * D, generator=gen, dtype=torch.float64)
    fusion = KDAFusion(qk_l2norm=True, beta_sigmoid=True, A_log=A_log, dt_bias=dt_bias)

    print(f"KDA reference demo: B={B} T={T} H={H} K=V={D}, fp64, layer-style inputs (L2 norm, softplus gate, sigmoid beta)")
    t0 = time.perf_counter()
    o_rec, s_rec = recurrent_kda_ref(q, k, v, g_raw, beta_logits, output_final_state=True, fusion=fusion)
    t1 = time.perf_counter()
    o_chk, s_chk = chunk_kda_ref(q, k, v, g_raw, beta_logits, output_final_state=True, fusion=fusion)
    t2 = time.perf_counter()
    err_o = ((o_chk - o_rec).norm() / o_rec.norm()).item()
    err_s = ((s_chk - s_rec).norm() / s_rec.norm()).item()
    print(f"  recurrent (token by token): {1e3 * (t1 - t0):8.1f} ms")
    print(f"  chunkwise (WY/UT, C=64):    {1e3 * (t2 - t1):8.1f} ms")
    print(f"  relative RMS difference: output {err_o:.2e}, final state {err_s:.2e}")
    ok = err_o < 1e-10 and err_s < 1e-10
    print("  agree to fp64 rounding: " + ("yes" if ok else "NO"))
    return 0 if ok else 1
