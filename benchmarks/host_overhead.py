"""Host time against GPU time of one chunked-KDA call at a short input (B=1, T=4096, H=16), on a GPU.

At short inputs the benchmark's times move between runs (session 9: our layer-fused forward 0.39 ms in
one run, 0.89 in the next) because the host, not the GPU, sets the pace. This prints, per provider and
mode: the host time of a call (perf_counter over calls that are not synchronised, so kernels queue
behind), the GPU time (the kernels' own durations from torch.profiler), the ``do_bench`` median the
benchmark reports, the number of launches, and a cProfile of the host side (top functions by own
time). The forward output is checked against FLA's where both run (one relative RMS line).

    PYTHONPATH=. python benchmarks/host_overhead.py [--T 4096] [--H 16] [--fla] [--top 18]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def host_ms(fn, n: int = 40) -> float:
    """Mean host milliseconds per call, calls queued back to back (one sync at the end only)."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / n * 1e3


def gpu_ms(fn) -> tuple[float, int]:
    """Sum of the kernels' device time of one call, and the number of kernels."""
    from kimi_linear.bench.common import kernel_sequence

    seq = kernel_sequence(fn)
    return sum(us for _, us in seq) / 1e3, len(seq)


def host_profile(fn, top: int) -> str:
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(20):
        fn()
    pr.disable()
    torch.cuda.synchronize()
    buf = io.StringIO()
    pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(top)
    return "\n".join(ln for ln in buf.getvalue().splitlines() if ln.strip())


def main() -> None:
    import triton.testing
    from chunk_kda_timing import fla_provider, make, ours

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--T", type=int, default=4096)
    ap.add_argument("--H", type=int, default=16)
    ap.add_argument("--fla", action="store_true")
    ap.add_argument("--top", type=int, default=18)
    args = ap.parse_args()
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}; "
          f"B=1 T={args.T} H={args.H} K=V=128 bf16, layer-fused options", flush=True)
    inp, extra = make(args.T, args.H, 128, True)
    leaves = {n: x.requires_grad_(True) for n, x in inp.items()}
    extra = {n: x.requires_grad_(True) for n, x in extra.items()}
    do = torch.randn_like(inp["v"])
    providers = {"ours_fused": ours(leaves, extra, True)}
    if args.fla:
        providers["fla_kda_fused"] = fla_provider(leaves, extra, True)
    outs = {}
    for name, fwd in providers.items():
        def step(fwd=fwd):
            for x in (*leaves.values(), *extra.values()):
                x.grad = None
            fwd().backward(do)

        for mode, fn in (("fwd", fwd), ("fwd+bwd", step)):
            with torch.no_grad() if mode == "fwd" else torch.enable_grad():
                if mode == "fwd":
                    outs[name] = fn().float()
                for _ in range(3):
                    fn()
                h = host_ms(fn)
                g, n = gpu_ms(fn)
                bench = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
                print(f"{name:14s} {mode:8s} host {h:6.3f} ms  GPU {g:6.3f} ms ({n} kernels)  do_bench {bench:6.3f} ms",
                      flush=True)
                if mode == "fwd+bwd" or name == "ours_fused":
                    print(host_profile(fn, args.top), flush=True)
    if len(outs) == 2:
        a, b = outs.values()
        print(f"forward outputs, ours vs FLA: relative RMS {((a - b).pow(2).mean() / b.pow(2).mean()).sqrt().item():.2e}")


if __name__ == "__main__":
    main()
