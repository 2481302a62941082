"""Launch-setting sweep of our chunked KDA kernels, one kernel at a time, on a GPU.

For each shape: per-kernel GPU time (torch.profiler) of one fwd+bwd with the settings in
``chunk_common.LAUNCH``, then for every kernel each candidate setting (num_warps, num_stages, and the
V-tile of the scans) with the others left alone. Every candidate must reproduce the baseline's
output and gradients (relative difference < 1e-2; the settings change no arithmetic, so a larger
difference is a miscompile) before its time counts. Ends with the best setting per kernel, the
fwd / fwd+bwd times with all of them applied, and one JSON line.

    PYTHONPATH=. python benchmarks/chunk_kda_sweep.py --shapes 1x65536x16 8x4096x32 --budget 400
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from chunk_kda_timing import fla_provider, make, ours  # noqa: E402

# the kernels each launch-table entry's time is the sum of (a variant may move work to a second kernel)
KERNEL_NAMES = {
    "gate": ("_gate_cumsum_kernel",), "gram": ("_gram_kernel",),
    "gram_diag": ("_gram_diag_kernel",),
    "solve": ("_inverse_kernel", "_wu_kernel"),
    "state_fwd": ("_state_fwd_kernel", "_output_kernel"), "output": ("_output_kernel",), "state_bwd": ("_state_bwd_kernel", "_dw_local_kernel"),
    "chunk_grad": ("_chunk_grad_kernel",), "grad_finish": ("_chunk_grad_finish_kernel",),
    "decay_grad": ("_decay_grad_kernel",), "gate_grad": ("_gate_grad_kernel",),
    "l2norm": ("_decay_grad_kernel", "_l2norm_bwd_kernel"),
}
# candidate sets named apart from the launch-table entry they set, and the kernels they are timed by
ENTRY = {"gate_merged": "gate", "gate_grad_merged": "gate_grad"}
KERNEL_NAMES.update(gate_merged=("_gate_cumsum_kernel", "_l2norm_fwd_kernel", "_prologue_kernel"),
                    gate_grad_merged=("_gate_grad_kernel", "_l2norm_bwd_kernel", "_epilogue_kernel"))
SCAN = [dict(BV=bv, num_warps=w, num_stages=s) for bv, w, s in itertools.product((16, 32, 64), (4, 8), (2, 3))]
# the forward scan with the output inside (output 1; timed with _output_kernel, which then does not run)
SCAN_OUT = [dict(output=o, BV=bv, num_warps=w, num_stages=s)
            for o, bv, w, s in ((0, None, None, None), (0, 64, 8, 2), (0, 32, 8, 3), (1, None, None, None), (1, 16, 4, 3),
                                (1, 32, 8, 3), (1, 64, 8, 2), (1, 32, 4, 2))]
# the state-gradient scan with and without its dO-only term split out (dw_local), at the shapes' best tiles
# (8 warps: the 4-warp tiles compile to 255 registers with 364-1040 B of spills on sm_90a, 8 warps
# with BV 32 to none; benchmarks/kernel_resources.py)
SCAN_BWD = ([dict(BV=bv, num_warps=w, num_stages=s, dw_local=1) for w in (8, 4) for bv, s in ((16, 3), (64, 2), (32, 3))]
            + [dict(BV=bv, num_warps=4, num_stages=s, dw_local=0) for bv, s in ((16, 3), (64, 2), (32, 3))])
# fewer warps keep a kernel's in-loop reductions inside one warp (shuffles, no shared-memory barriers)
PLAIN = [dict(num_warps=w, num_stages=s) for w, s in ((1, 3), (2, 3), (2, 2), (4, 3), (8, 3))]
# precise (chunk_bwd.decay_precision): 4 = two passes with the decayed operand split (default), 1 = 3-pass,
# 2 = one pass on operands rounded to nearest tf32, 0 = one truncating pass
# factored = 1: the diagonal sub-blocks through one reference where the sub-chunk's gate span allows
# (factored = 2: through the sub-chunk's midpoint, spans up to 120)
# (rolled = 1: the halving levels as a loop; no spills for sm_90a)
DECAY = ([dict(num_warps=w, num_stages=3, BK=32, precise=4, factored=f, rolled=r)
          for r in (0, 1) for f in (1, 0, 2) for w in (2, 4)]
         + [dict(num_warps=w, num_stages=3, BK=32, precise=p) for p in (1, 2, 0) for w in (2, 4)])
GRAD = ([c for c in PLAIN if c["num_warps"] >= 4]
        + [dict(num_warps=8, num_stages=s, BK=bk, BV=bv) for bk, bv, s in ((32, 32, 3), (32, 32, 2), (64, 16, 3), (32, 64, 3))])
# the solve: the inverse (inverse_warps) and the products over (chunk, head, column block of BV) programs
SOLVE = [dict(inverse_warps=iw, BV=bv, num_warps=w) for iw, bv, w in ((1, 64, 8), (2, 64, 8), (1, 32, 4), (1, 64, 4))]
GATE = [dict(BK=bk, num_warps=w) for bk, w in ((32, 4), (128, 4), (64, 4), (32, 2), (16, 2))]
# with the q/k norm in the same launch (layer-fused setting; timed with the separate norm kernel when off)
GATE_MERGED = [dict(merge_l2norm=m, BK=64, num_warps=4) for m in (0, 1)]
GATE_GRAD_MERGED = [dict(merge_l2norm=m, num_warps=4) for m in (0, 1)]
GRAM_DIAG = [dict(BH=bh, num_warps=w) for bh, w in ((2, 1), (4, 1), (1, 1), (2, 2), (4, 2), (8, 2), (8, 4), (4, 4))]
WARPS = [dict(num_warps=w) for w in (1, 2, 4, 8)]
CANDIDATES = {"state_fwd": SCAN_OUT, "state_bwd": SCAN_BWD, "decay_grad": DECAY, "chunk_grad": GRAD, "gram": PLAIN,
              "gram_diag": GRAM_DIAG, "gate": GATE, "gate_grad": WARPS, "solve": SOLVE, "output": PLAIN,
              # dq / dk in the input dtype ahead of the fused l2norm backward (the layer-fused setting only)
              "l2norm": [dict(half_dy=0), dict(half_dy=1)],
              "gate_merged": GATE_MERGED, "gate_grad_merged": GATE_GRAD_MERGED}


DEVICE = "cuda"  # "cpu" (with DTYPE fp16) only to check the plumbing under TRITON_INTERPRET=1
DTYPE = torch.bfloat16
FUSED = False  # --fused: the layer-fused setting (raw gate with A_log / dt_bias, q/k l2norm, beta sigmoid)


def inputs(B: int, T: int, H: int, K: int = 128, seed: int = 0, fused: bool | None = None):
    """The Figure-2 log-decay setting (``chunk_kda_timing.make``; the layer-fused one with ``fused``,
    default FUSED) as grad leaves ``[q, k, v, g, beta(, A_log, dt_bias)]``, plus an upstream grad."""
    inp, extra = make(T, H, K, fused=FUSED if fused is None else fused, dtype=DTYPE, device=DEVICE, seed=seed, B=B)
    xs = [x.requires_grad_(True) for x in list(inp.values()) + list(extra.values())]
    gen = torch.Generator(device=DEVICE).manual_seed(seed + 1)
    do = torch.randn(B, T, H, K, generator=gen, device=DEVICE).to(DTYPE)
    return xs, do


def _provider_args(xs):
    """The leaves of :func:`inputs` as ``chunk_kda_timing``'s providers take them: (inputs, extra, fused)."""
    return dict(zip(("q", "k", "v", "g", "beta"), xs[:5])), dict(zip(("A_log", "dt_bias"), xs[5:])), len(xs) == 7


def forward(xs):
    """Our chunk_kda output on the leaves of :func:`inputs` (fused when they carry A_log / dt_bias)."""
    return ours(*_provider_args(xs))()


def step_once(xs, do):
    """One fwd+bwd with fresh gradients (no accumulation kernels): what the per-kernel profiles time."""
    for x in xs:
        x.grad = None
    o = forward(xs)
    o.backward(do)
    return o


def run_once(xs, do):
    """Output and gradients in fp32, for comparing a candidate with the baseline (casts not profiled)."""
    o = step_once(xs, do)
    return [o.detach().float()] + [x.grad.float() for x in xs]


def fused_profile(B: int, T: int, H: int, K: int = 128) -> dict[str, float]:
    """Per-kernel ms of one fwd+bwd of the layer's fused path (l2norm, raw gate, beta sigmoid)."""
    return per_kernel_ms(*inputs(B, T, H, K, fused=True))


def fla_forward(xs):
    """FLA 0.6.0's exact chunk_kda output on the same leaves (its fused options when they carry A_log /
    dt_bias); ImportError without FLA."""
    return fla_provider(*_provider_args(xs))()


def fla_profile(B: int, T: int, H: int, K: int = 128) -> dict[str, float]:
    """Per-kernel ms of one fwd+bwd of FLA's exact chunk_kda (the peer's budget per stage), or {}."""
    try:
        import fla.ops.kda  # noqa: F401
    except ImportError:
        return {}
    from kimi_linear.bench.common import kernel_times

    xs, do = inputs(B, T, H, K)

    def step():
        for x in xs:
            x.grad = None
        fla_forward(xs).backward(do)

    return {name: ms for name, (ms, _) in kernel_times(step, torch.device(DEVICE), reps=3).items()}


def kernel_sum(times: dict[str, float], names: tuple[str, ...]) -> float:
    """Total ms of the named kernels in a per-kernel profile; nan when none of them ran (a wrong name
    must not read as a time of 0)."""
    got = [times[n] for n in names if n in times]
    return sum(got) if got else float("nan")


def per_kernel_ms(xs, do, reps: int = 3) -> dict[str, float]:
    from kimi_linear.bench.common import kernel_times

    times = kernel_times(lambda: step_once(xs, do), torch.device(DEVICE), reps=reps)
    return {name: ms for name, (ms, _) in times.items()}


def timed_fns(xs, do):
    """fwd and fwd+bwd closures (gradients accumulate across calls; the time is the same)."""

    def o_fn():
        return forward(xs)

    def fb_fn():
        o_fn().backward(do)

    return o_fn, fb_fn


def fla_timed_fns(xs, do):
    """FLA 0.6.0's exact chunk_kda as fwd and fwd+bwd closures on the same inputs, or None."""
    try:
        import fla.ops.kda  # noqa: F401
    except ImportError:
        return None

    def o_fn():
        return fla_forward(xs)

    def fb_fn():
        o_fn().backward(do)

    return o_fn, fb_fn


def compare_shapes(shapes: list[str], best: dict[str, dict]) -> dict:
    """fwd / fwd+bwd ms of ours with the baseline and the best settings (launch-table edits), and FLA's
    exact path, per shape, all in this run (ours must match the baseline's outputs and gradients first)."""
    import triton

    from kimi_linear.ops.kda import chunk_common

    out = {}
    for shape in shapes:
        B, T, H = (int(x) for x in shape.split("x"))
        xs, do = inputs(B, T, H)
        row = {}
        for label, edits in (("base", {}), ("best", best)):
            with chunk_common.launch_overrides(edits):
                got = run_once(xs, do)
                if label == "base":
                    ref = got
                err = max(rel(a, b) for a, b in zip(got, ref))
                o_fn, fb_fn = timed_fns(xs, do)
                row[label] = dict(fwd=triton.testing.do_bench(o_fn, warmup=5, rep=40) if err < 1e-2 else float("nan"),
                                  fwdbwd=triton.testing.do_bench(fb_fn, warmup=5, rep=40) if err < 1e-2 else float("nan"),
                                  err=err)
        fla = fla_timed_fns(xs, do)
        if fla is not None:
            fla_err = rel(fla[0]().float(), ref[0])
            row["fla"] = dict(fwd=triton.testing.do_bench(fla[0], warmup=5, rep=40),
                              fwdbwd=triton.testing.do_bench(fla[1], warmup=5, rep=40), err=fla_err)
        print(f"== compare {shape}: " + ", ".join(f"{k} fwd {v['fwd']:.3f} fwd+bwd {v['fwdbwd']:.3f} (diff {v['err']:.1e})"
                                                  for k, v in row.items()), flush=True)
        out[shape] = row
    return out


def show_profile(rows: dict, key: str, title: str, shape: str, times: dict[str, float], top: int) -> None:
    """Print a per-kernel profile (slowest first; plot_stage_times.py parses these blocks) into rows[key]."""
    ordered = sorted(times.items(), key=lambda x: -x[1])
    rows[key] = {k: round(v, 4) for k, v in ordered}
    print(f"== {shape}: {title} (total {sum(times.values()):.3f})", flush=True)
    for name, ms in ordered[:top]:
        print(f"   {ms:8.3f}  {name[:90]}", flush=True)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def main() -> None:
    import triton

    from kimi_linear.ops.kda import chunk_common

    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=["1x65536x16", "8x4096x32"])
    ap.add_argument("--kernels", nargs="+", default=list(CANDIDATES))
    ap.add_argument("--fla-profile", action="store_true", help="also print FLA's per-kernel times (if installed)")
    ap.add_argument("--fused-profile", action="store_true", help="also print the fused path's per-kernel times")
    ap.add_argument("--fused", action="store_true",
                    help="sweep on the layer-fused setting (raw gates with A_log / dt_bias, q/k l2norm, beta sigmoid)")
    ap.add_argument("--budget", type=float, default=400.0, help="seconds for the whole sweep (shared equally by shapes)")
    ap.add_argument("--compare", nargs="*", default=[],
                    help="shapes at which to time ours (baseline and the last shape's best settings) and FLA's exact path")
    args = ap.parse_args()
    global FUSED
    FUSED = args.fused
    t_start = time.time()
    best_entries: dict[str, dict] = {}
    report = {"device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", "torch": torch.__version__, "triton": triton.__version__,
              "setting": "kda_layer" if FUSED else "kda",
              "shapes": {}}
    for i_shape, shape in enumerate(args.shapes):
        shape_deadline = t_start + args.budget * (i_shape + 1) / len(args.shapes)
        B, T, H = (int(x) for x in shape.split("x"))
        xs, do = inputs(B, T, H)
        ref = run_once(xs, do)
        base = per_kernel_ms(xs, do)
        rows = {"sweep": {}}
        show_profile(rows, "baseline", "baseline per-kernel ms", shape, base, 12)
        if args.fused_profile:
            show_profile(rows, "fused_baseline", "fused path per-kernel ms", shape, fused_profile(B, T, H), 16)
        if args.fla_profile:
            show_profile(rows, "fla_baseline", "FLA exact path per-kernel ms", shape, fla_profile(B, T, H), 20)
        best = {}
        for kname in args.kernels:
            entry = ENTRY.get(kname, kname)
            kfun = KERNEL_NAMES[kname]
            results = []
            for cand in CANDIDATES[kname]:
                if time.time() > shape_deadline:
                    print("   (budget reached)", flush=True)
                    break
                try:
                    with chunk_common.launch_overrides({entry: cand}):
                        got = run_once(xs, do)
                        err = max(rel(a, b) for a, b in zip(got, ref))
                        ms = kernel_sum(per_kernel_ms(xs, do), kfun) if err < 1e-2 else float("nan")
                except Exception as e:  # noqa: BLE001 (a setting that does not compile or fit is skipped)
                    err, ms = float("nan"), float("nan")
                    print(f"   {kname} {cand}: {type(e).__name__}: {str(e)[:120]}", flush=True)
                results.append({**cand, "ms": round(ms, 4), "err": err})
                print(f"   {kname:11s} {cand}  {ms:8.3f} ms  (diff {err:.1e})", flush=True)
            ok = [r for r in results if r["ms"] == r["ms"]]
            if ok:
                b = min(ok, key=lambda r: r["ms"])
                best[kname] = {k: v for k, v in b.items() if k not in ("ms", "err")}
                print(f"   -> {kname}: best {best[kname]} {b['ms']:.3f} ms (baseline {kernel_sum(base, kfun):.3f})",
                      flush=True)
            rows["sweep"][kname] = results
        best_entries = {}
        for kname, cfg in best.items():  # candidate sets of one entry: the later set's best wins
            best_entries[ENTRY.get(kname, kname)] = cfg
        o_fn, fb_fn = timed_fns(xs, do)
        with chunk_common.launch_overrides(best_entries):
            fwd_best = triton.testing.do_bench(o_fn, warmup=5, rep=40)
            fb_best = triton.testing.do_bench(fb_fn, warmup=5, rep=40)
        fwd_base = triton.testing.do_bench(o_fn, warmup=5, rep=40)
        fb_base = triton.testing.do_bench(fb_fn, warmup=5, rep=40)
        rows.update(best=best, fwd_ms_base=round(fwd_base, 4), fwdbwd_ms_base=round(fb_base, 4),
                    fwd_ms_best=round(fwd_best, 4), fwdbwd_ms_best=round(fb_best, 4))
        print(f"== {shape}: fwd {fwd_base:.3f} -> {fwd_best:.3f} ms, fwd+bwd {fb_base:.3f} -> {fb_best:.3f} ms "
              f"with {best}", flush=True)
        report["shapes"][shape] = rows
    if args.compare:
        report["compare"] = compare_shapes(args.compare, best_entries)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
