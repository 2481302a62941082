"""Batch-1 decode matrix-vector products on a GPU: our one-launch kernels against cuBLAS, tile sweeps.

At the decode benchmark's geometry (hidden 2304, bf16, one token):
* ``fused_linear`` (:mod:`kimi_linear.ops.gemv`) over a KDA layer's six input projections
  (q, k, v 4096 rows each; f_a, g_a 128; b 32), an MLA layer's two (q 6144, kv_a 576) and the
  4096 -> 2304 output projection, against one ``F.linear`` (cuBLAS) per weight;
* the router's product inside the routing kernel against cuBLAS + the routing kernel;
* the MoE's single-token kernels (:mod:`kimi_linear.ops.moe_decode`, 16 experts top-8 + 1 shared
  expert of 2304 -> 1024 -> 2304) against the tensor-core kernels used for larger batches.
Every setting must match its reference (relative error < 1e-2) before it is timed with
``triton.testing.do_bench_cudagraph`` (decode steps are graph-replayed). Times are printed against
the floor: weight bytes over the measured copy bandwidth.

    PYTHONPATH=. python benchmarks/decode_gemv_sweep.py [--quick]
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json

import torch
import torch.nn.functional as F

from kimi_linear.bench.common import copy_bandwidth

CURRENT_ONLY = False  # --current: time the settings in use only (no sweep)
# --fold: the launches as the folded decode step makes them (modeling.FOLD_DECODE_NORMS): the block's
# RMSNorm inside the input projections (kda_in, mla_in), the residual add in the output projection's
# epilogue (o_proj); tiles swept for the NORM variant (gemv.NORM_TILES) from a short list
FOLD = False


def _rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def timed(fn) -> float:
    import triton.testing

    fn()
    return triton.testing.do_bench_cudagraph(fn, rep=30) * 1e3  # us


def sweep_fused_linear(dev, bw, quick: bool, report: dict, only_shapes: set[str] | None = None) -> None:
    from kimi_linear.ops import gemv

    dt, D = torch.bfloat16, 2304
    shapes = {"kda_in": (D, [4096, 4096, 4096, 128, 128, 32]), "mla_in": (D, [6144, 576]), "o_proj": (4096, [2304]),
              "lowrank_up": (128, [4096])}
    # session 10: 1- and 2-row blocks (more programs) and 1-warp programs added; the two "wide" classes
    # (many rows: a KDA layer's inputs; few: the output projections, the MLA inputs) tuned apart
    wide = [dict(BLOCK_R=r, BLOCK_D=d, num_warps=w) for r, d, w in
            itertools.product((1, 2, 4, 8, 16), (256, 512, 1024), (1, 2, 4))]
    narrow = [dict(BLOCK_R=r, BLOCK_D=128, num_warps=w) for r, w in itertools.product((4, 8, 16, 32, 64), (1, 2, 4))]
    if quick:
        wide, narrow = wide[:4], narrow[:4]
    if FOLD:
        shapes.pop("lowrank_up")
        wide = [dict(BLOCK_R=r, BLOCK_D=d, num_warps=1) for r, d in itertools.product((1, 2, 4), (256, 512, 1024))]
    base = {n: dict(c) for n, c in gemv.TILES.items()}
    base_norm = {n: dict(c) for n, c in gemv.NORM_TILES.items()}
    best_per_shape = {}
    # launches per decode step of the benchmark model (20 KDA + 7 MLA layers): a class's tile is the
    # best by this weighted sum over its shapes (wide_few: 27 output projections + 7 MLA inputs)
    per_step = {"kda_in": 20, "mla_in": 7, "o_proj": 27, "lowrank_up": 40}
    class_total: dict[str, dict[str, float]] = {}
    for name, (d_in, rows) in shapes.items():
        if only_shapes and name not in only_shapes:
            continue
        ws = [torch.randn(r, d_in, device=dev, dtype=dt) * d_in**-0.5 for r in rows]
        # the model reads every weight once per step, cold; copies (>= 256 MB in all, 5x the H100's L2)
        # timed back to back in one graph keep each launch's weights out of L2, as in the model
        nbytes = sum(w.numel() * 2 for w in ws)
        copies = [ws] + [[w.clone() for w in ws] for _ in range(max(1, -(-(256 << 20) // nbytes)) - 1)]
        floor = nbytes / bw * 1e6
        kind = "narrow" if d_in <= 256 else gemv._tiles_class(d_in, sum(rows))
        for N in (1, 2, 4) if name == "kda_in" else (1,):
            x = torch.randn(N, d_in, device=dev, dtype=dt)
            ref = [F.linear(x.float(), w.float()) for w in ws]
            fold = {}
            if FOLD and name != "o_proj":  # the un-normalised hidden state and the block's norm weight
                from kimi_linear.ops.norm import rms_norm

                x = x * 4.0
                fold["norm_weight"] = (torch.rand(d_in, device=dev) + 0.5).to(dt)
                ref = [F.linear(rms_norm(x.float(), fold["norm_weight"].float()), w.float()) for w in ws]
            elif FOLD:
                fold["residual"] = torch.randn(N, sum(rows), device=dev, dtype=dt)
                ref = [fold["residual"].float() + r for r in ref]
            cublas = timed(functools.partial(lambda x, cs: [F.linear(x, w) for ws in cs for w in ws], x, copies)) / len(copies)
            best = None
            tiles = gemv.NORM_TILES if "norm_weight" in fold else gemv.TILES
            current = tiles.get(kind, base[kind])
            cands = [dict(current)] if CURRENT_ONLY else narrow if kind == "narrow" else wide
            for cand in (cands if N == 1 else [best_per_shape[name][1]]):
                tiles[kind] = cand
                try:
                    fn = functools.partial(gemv.fused_linear, x, ws, backend="triton", **fold)
                    err = max(_rel(a, b) for a, b in zip(fn(), ref))
                    us = timed(functools.partial(lambda x, cs, kw: [gemv.fused_linear(x, ws, backend="triton", **kw)
                                                                    for ws in cs], x, copies, fold)) / len(copies)
                except Exception as e:  # noqa: BLE001 (a setting that does not compile is skipped)
                    print(f"{name} N={N} {cand}: {type(e).__name__}: {str(e)[:80]}")
                    continue
                finally:
                    gemv.TILES.clear()
                    gemv.TILES.update({n: dict(c) for n, c in base.items()})
                    gemv.NORM_TILES.clear()
                    gemv.NORM_TILES.update({n: dict(c) for n, c in base_norm.items()})
                report["rows"].append(dict(op="fused_linear", shape=name, N=N, **cand, us=us, err=err))
                if N == 1:
                    tot = class_total.setdefault(kind + (" norm" if "norm_weight" in fold else ""), {})
                    key = json.dumps(cand)
                    tot[key] = tot.get(key, 0.0) + per_step[name] * (us if err < 1e-2 else float("inf"))
                if err < 1e-2 and (best is None or us < best[0]):
                    best = (us, cand)
            if best is None:
                print(f"fused_linear {name} N={N}: no setting ran", flush=True)
                return
            if N == 1:
                best_per_shape[name] = best
            print(f"fused_linear {name}{' folded' if fold else ''} N={N} ({kind}): cuBLAS ({len(ws)} launches) "
                  f"{cublas:.1f} us{' (no norm / add)' if fold else ''}, ours "
                  f"{best[0]:.1f} us with {best[1]} (floor {floor:.1f} us; ours at {floor / best[0]:.0%} of copy "
                  f"bandwidth; weights cold: {len(copies)} copies)", flush=True)
            report["rows"].append(dict(op="cublas", shape=name, N=N, us=cublas))
    for label, tot in class_total.items():
        kind = label.split()[0]
        now = base_norm.get(kind, base[kind]) if label.endswith(" norm") else base[kind]
        ranked = sorted(tot.items(), key=lambda kv: kv[1])
        cur = tot.get(json.dumps(now))
        print(f"fused_linear class {label}: best {ranked[0][0]} {ranked[0][1]:.0f} us per step (current "
              f"{now}: {cur if cur is None else round(cur)} us); next {[(k, round(v)) for k, v in ranked[1:4]]}",
              flush=True)


def sweep_moe(dev, bw, quick: bool, report: dict) -> None:
    from kimi_linear.ops import moe_decode as md
    from kimi_linear.ops.moe import grouped_swiglu

    dt, E, D, I, k = torch.bfloat16, 16, 2304, 1024, 8
    mk = lambda *s: torch.randn(*s, device=dev, dtype=dt) * s[-1] ** -0.5  # noqa: E731
    w1, w3, w2 = [mk(I, D) for _ in range(E)], [mk(I, D) for _ in range(E)], [mk(D, I) for _ in range(E)]
    sh = ([mk(I, D)], [mk(I, D)], [mk(D, I)])
    x = torch.randn(1, D, device=dev, dtype=dt)
    idx = torch.randperm(E, device=dev)[:k][None]
    wts = torch.rand(1, k, device=dev)
    ref = grouped_swiglu(x.float(), torch.cat([idx, torch.full_like(idx[:, :1], E)], 1),
                         torch.cat([wts, torch.ones_like(wts[:, :1])], 1),
                         [w.float() for w in w1 + sh[0]], [w.float() for w in w3 + sh[1]], [w.float() for w in w2 + sh[2]])
    floor = (k + 1) * 3 * I * D * 2 / bw * 1e6
    step = functools.partial(md.moe_decode, x, idx, wts, w1, w3, w2, shared=sh, backend="triton")
    base = {n: dict(c) for n, c in md.TILES.items()}
    md.SINGLE_TOKEN_KERNELS = False
    dot_us, dot_err = timed(step), _rel(step(), ref)
    md.SINGLE_TOKEN_KERNELS = True
    print(f"moe N=1: tensor-core kernels {dot_us:.1f} us (err {dot_err:.1e}), floor {floor:.1f} us", flush=True)
    report["rows"].append(dict(op="moe_dot", us=dot_us, err=dot_err))
    # session 10: 1- and 2-row blocks added (and a compile-time unrolled D loop, no gain, removed)
    gate_up = [dict(BLOCK_R=r, BLOCK_D=d, num_warps=w) for r, d, w in
               itertools.product((1, 2, 4, 8), (256, 512, 1024), (1, 2, 4))]
    down = [dict(BLOCK_R=r, BLOCK_I=i, num_warps=w)
            for r, i, w in itertools.product((1, 2, 4, 8), (512, 1024), (1, 2, 4))]
    if quick:
        gate_up, down = gate_up[:3], down[:3]
    if CURRENT_ONLY:
        gate_up, down = [dict(md.TILES["gate_up_one"])], [dict(md.TILES["down_one"])]
    # gate_up again once down has its best tile (the first pass timed it beside the old down tile)
    for name, cands in (("gate_up_one", gate_up), ("down_one", down), ("gate_up_one", gate_up)):
        best = None
        for cand in cands:
            md.TILES[name] = cand
            try:
                err, us = _rel(step(), ref), timed(step)
            except Exception as e:  # noqa: BLE001
                print(f"moe {name} {cand}: {type(e).__name__}: {str(e)[:80]}")
                continue
            report["rows"].append(dict(op="moe_one", kernel=name, **cand, us=us, err=err))
            if err < 1e-2 and (best is None or us < best[0]):
                best = (us, cand)
        if best is None:
            print(f"moe {name}: no setting ran", flush=True)
            return
        md.TILES[name] = best[1]  # keep the best for the next kernel's sweep
        print(f"moe N=1 {name}: best {best[1]} -> whole MoE {best[0]:.1f} us", flush=True)
    us = timed(step)
    print(f"moe N=1 single-token kernels, best tiles: {us:.1f} us = {floor / us:.0%} of copy bandwidth "
          f"(tensor-core kernels {dot_us:.1f} us)", flush=True)
    md.TILES.update(base)


def sweep_route(dev, quick: bool, report: dict) -> None:
    """The router with its logits computed in the routing kernel (one program per token) against
    cuBLAS in fp32 + the routing kernel on logits, E=16, top-8, D=2304, bf16, one token."""
    from kimi_linear.ops import moe_route_kernel as rk
    from kimi_linear.ops.moe import route, route_tokens

    E, D, k = 16, 2304, 8
    x = torch.randn(1, D, device=dev, dtype=torch.bfloat16)
    w_gate = torch.randn(E, D, device=dev, dtype=torch.bfloat16) * D**-0.5
    bias = torch.randn(E, device=dev) * 0.1

    def two_step():
        return route(F.linear(x.float(), w_gate.float()), bias, k, scaling=2.5, backend="triton")

    want = two_step()
    base = dict(rk.HIDDEN_TILE)
    print(f"route N=1: cuBLAS fp32 logits + routing kernel {timed(two_step):.1f} us", flush=True)
    # the split router (slices of SPLIT_D features per program, the last to finish routes) against one
    # program per token (SPLIT_D 0), then the one-program tiles below
    split_base = rk.SPLIT_D, rk.SPLIT_WARPS
    scratch = rk.RouterScratch()
    for split_d, warps in ((0, 4), (128, 4), (256, 4), (256, 2), (512, 4)):
        rk.SPLIT_D, rk.SPLIT_WARPS = split_d, warps
        fn = functools.partial(route_tokens, x, w_gate, bias, k, scaling=2.5, backend="triton", scratch=scratch)
        got = fn()
        same = torch.equal(got[1].sort(-1).values, want[1].sort(-1).values)
        us = timed(fn)
        report["rows"].append(dict(op="route_split", SPLIT_D=split_d, num_warps=warps, us=us, same_experts=same))
        print(f"route N=1 split {rk.split_plan(E, D)} on {warps} warps: {us:.1f} us (same experts: {same})", flush=True)
    rk.SPLIT_D, rk.SPLIT_WARPS = split_base  # (the one-program sweep below passes no scratch)
    cands = [dict(BLOCK_D=d, num_warps=w) for d, w in itertools.product((256, 512, 1024, 2048), (4, 8, 16))]
    for cand in cands[:3] if quick else cands:
        rk.HIDDEN_TILE.update(cand)
        fn = functools.partial(route_tokens, x, w_gate, bias, k, scaling=2.5, backend="triton")
        try:
            got = fn()
            same = torch.equal(got[1].sort(-1).values, want[1].sort(-1).values)
            us = timed(fn)
        except Exception as e:  # noqa: BLE001
            print(f"route {cand}: {type(e).__name__}: {str(e)[:80]}")
            continue
        finally:
            rk.HIDDEN_TILE.update(base)
        report["rows"].append(dict(op="route_tokens", **cand, us=us, same_experts=same))
        print(f"route N=1 logits in the kernel {cand}: {us:.1f} us (same experts: {same})", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="a few settings only (a smoke run)")
    ap.add_argument("--only", default="gemv,route,moe",
                    help="comma list of gemv, lowrank (the gates' 128 -> 4096 up-projection only), route, moe")
    ap.add_argument("--current", action="store_true", help="time the settings in use only, no sweep")
    ap.add_argument("--fold", action="store_true",
                    help="gemv: the folded decode step's launches (norm in the inputs, residual in o_proj)")
    args = ap.parse_args()
    global CURRENT_ONLY, FOLD
    CURRENT_ONLY, FOLD = args.current, args.fold
    torch.manual_seed(0)
    dev = torch.device("cuda")
    bw = copy_bandwidth(dev)  # bytes/s
    report = {"device": torch.cuda.get_device_name(), "copy_tbps": bw / 1e12, "rows": []}
    print(f"{report['device']}: copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    parts = set(args.only.split(","))
    if "gemv" in parts or "lowrank" in parts:
        sweep_fused_linear(dev, bw, args.quick, report, None if "gemv" in parts else {"lowrank_up"})
    if "route" in parts:
        sweep_route(dev, args.quick, report)
    if "moe" in parts:
        sweep_moe(dev, bw, args.quick, report)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
