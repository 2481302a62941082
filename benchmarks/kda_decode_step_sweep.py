"""The KDA layer's decode step after its input projections: one fused launch (ops/kda/decode_step.py)
at several warp counts against the unfused three launches (up-projections, recurrent kernel, gated
norm), on the decode benchmark's geometry (32 heads of 128, rank 128, bf16).

Each variant runs ``--layers`` layers' worth of steps (separate weights and state pools, so that every
layer reads its bytes from DRAM as in the model) captured in one CUDA graph; the time is per layer.
Correctness gate first: every variant's outputs and states against the composition's (``rel_rms``);
a second step from the first one's state checks that the per-head counters were left at zero.
Floor: the bytes per layer (state read + write, both up-projection weights) over the copy bandwidth.

    PYTHONPATH=. python benchmarks/kda_decode_step_sweep.py --batch 1 --layers 20
"""

from __future__ import annotations

import argparse

import torch


def copy_bandwidth(dev: torch.device, nbytes: int = 1 << 30) -> float:
    """Bytes/s of a device-to-device copy (read + write counted)."""
    a = torch.empty(nbytes // 2, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        b.copy_(a)
    end.record()
    torch.cuda.synchronize()
    return 10 * nbytes / (start.elapsed_time(end) / 1e3)


def graph_time_us(fn, reps: int = 50) -> float:
    """Mean us per call of ``fn`` replayed from a CUDA graph (median of 5 timings of ``reps`` replays)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    out = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            g.replay()
        end.record()
        torch.cuda.synchronize()
        out.append(start.elapsed_time(end) * 1e3 / reps)
    return sorted(out)[2]


@torch.no_grad()
def main() -> None:
    from kimi_linear.ops.gemv import fused_linear
    from kimi_linear.ops.kda.decode_step import kda_decode_step
    from kimi_linear.ops.kda.fusion import KDAFusion
    from kimi_linear.ops.kda.recurrent import recurrent_kda
    from kimi_linear.ops.norm import gated_rms_norm
    from tests.numerics import rel_rms

    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--layers", type=int, default=20)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--tiles", default="32:2,32:4,32:8,64:4,64:8,128:8",
                    help="BV:num_warps launch settings to time (BV: state columns per program)")
    args = ap.parse_args()
    dev = torch.device("cuda")
    N, H, K, L, dt = args.batch, args.heads, 128, args.layers, torch.bfloat16
    g = torch.Generator(device="cpu").manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g).to(dev)  # noqa: E731
    # one projection buffer per layer, sliced as the input launch's outputs are: q, k, v, f_a, g_a, b
    widths = [H * K, H * K, H * K, K, K, H]
    layers = []
    for _ in range(L):
        buf = r(N, sum(widths)).to(dt)
        q, k, v, f_a, g_a, b = buf.split(widths, dim=1)
        layers.append(dict(acts=dict(q=q, k=k, v=v, gate_a=f_a, out_gate_a=g_a, beta=b),
                           params=dict(gate_b_weight=(r(H * K, K) * K ** -0.5).to(dt),
                                       out_gate_b_weight=(r(H * K, K) * K ** -0.5).to(dt),
                                       norm_weight=(1 + 0.1 * r(K)).to(dt), A_log=r(H) * 0.5, dt_bias=r(H * K) * 0.5),
                           pool=r(N, H, K, K) * 0.3))
    idx = torch.arange(N, device=dev)

    def fused(lay, pool, tile):
        return kda_decode_step(**lay["acts"], **lay["params"], eps=1e-5, state_pool=pool, state_indices=idx,
                               num_heads=H, head_k_dim=K, BV=tile[0], num_warps=tile[1])

    def unfused(lay, pool):
        a, p = lay["acts"], lay["params"]
        g_raw, gate = fused_linear([a["gate_a"], a["out_gate_a"]], [p["gate_b_weight"], p["out_gate_b_weight"]])
        fusion = KDAFusion(qk_l2norm=True, beta_sigmoid=True, A_log=p["A_log"], dt_bias=p["dt_bias"])
        o, _ = recurrent_kda(a["q"].view(N, 1, H, K), a["k"].view(N, 1, H, K), a["v"].view(N, 1, H, K),
                             g_raw.view(N, 1, H, K), a["beta"].view(N, 1, H), initial_state=pool,
                             state_indices=idx, fusion=fusion)
        return gated_rms_norm(o, gate.view(N, 1, H, K), p["norm_weight"], 1e-5).view(N, H * K)

    tiles = [tuple(int(x) for x in t.split(":")) for t in args.tiles.split(",")]
    # gate: two steps of every variant from the same state against the unfused ones
    ref_pool = layers[0]["pool"].clone()
    unfused(layers[0], ref_pool)
    ref_pool2 = ref_pool.clone()
    ref2 = unfused(layers[0], ref_pool2)
    for w in tiles:
        pool = layers[0]["pool"].clone()
        fused(layers[0], pool, w)
        out = fused(layers[0], pool, w)
        e_y, e_s = rel_rms(out.float(), ref2.float()), rel_rms(pool, ref_pool2)
        ok = e_y < 2e-2 and e_s < 5e-3 and bool(torch.isfinite(out).all())
        print(f"gate BV={w[0]}, {w[1]} warps: output rel RMS {e_y:.2e}, state {e_s:.2e} -> {'pass' if ok else 'FAIL'}")
        if not ok:
            raise SystemExit("correctness gate failed")
    bw = copy_bandwidth(dev)
    nbytes = N * H * K * K * 4 * 2 + 2 * H * K * K * 2  # state read + write, both up-projection weights
    floor = nbytes / bw * 1e6
    print(f"{torch.cuda.get_device_name(dev)}, copy {bw / 1e12:.2f} TB/s; batch {N}, {H} heads of {K}, {L} layers; "
          f"floor {floor:.2f} us per layer ({nbytes / 1e6:.2f} MB)")
    t = graph_time_us(lambda: [unfused(lay, lay["pool"]) for lay in layers]) / L
    print(f"unfused (3 launches): {t:.2f} us per layer ({floor / t:.0%} of the copy rate)")
    for w in tiles:
        t = graph_time_us(lambda w=w: [fused(lay, lay["pool"], w) for lay in layers]) / L
        print(f"fused, BV={w[0]}, {w[1]} warps: {t:.2f} us per layer ({floor / t:.0%} of the copy rate)")


if __name__ == "__main__":
    main()
