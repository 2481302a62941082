"""Where a cached prefill's time goes: wall time against GPU kernel time, the top kernels, and the host
ops that take the most CPU time (syncs, small launches) -- for the decode benchmark's model.

`kimi-linear bench decode` measured the hybrid's prefill at 4K tokens at 0.5-0.8 s against 0.2 s for
the all-MLA stack, nearly flat from 4K to 16K: a fixed cost that is not the chunked KDA kernels
(~0.5 ms per layer at this size). This script shows whether the GPU is busy or waiting on the host.

    PYTHONPATH=. python benchmarks/prefill_profile.py --layout hybrid --context 4096 [--before]

``--before`` switches off session 11's prefill changes (the grouped-GEMM experts and the one-launch
short conv) so one run can time both forms.
"""

from __future__ import annotations

import argparse
import time

import torch


@torch.no_grad()
def main() -> None:
    from kimi_linear.bench.model_decode import bench_config, build_model
    from kimi_linear.generation.cache import cache_for_config
    from kimi_linear.generation.generate import _model_dtype, forward_last_logits

    ap = argparse.ArgumentParser()
    ap.add_argument("--layout", default="hybrid")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--layers", type=int, default=27)
    ap.add_argument("--vocab", type=int, default=163840)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--before", action="store_true",
                    help="per-expert GEMM loop and the PyTorch short conv (the forms before session 11)")
    args = ap.parse_args()
    if args.before:
        import kimi_linear.ops.conv as conv
        from kimi_linear.ops import moe

        moe.GROUPED_MM = False
        conv.SEQUENCE_KERNEL = False
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    cfg = bench_config(args.layout, layers=args.layers, vocab=args.vocab, experts=args.experts)
    model = build_model(cfg, dev, dtype)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def prefill(n: int) -> float:
        ids = torch.randint(0, cfg.vocab_size, (1, n), device=dev)
        cache = cache_for_config(model.config, batch_size=1, max_len=n, device=dev, dtype=_model_dtype(model))
        sync()
        t0 = time.perf_counter()
        forward_last_logits(model, ids, cache)
        sync()
        return (time.perf_counter() - t0) * 1e3

    print(f"warm-up prefill 1024: {prefill(1024):.1f} ms")
    walls = [prefill(args.context) for _ in range(3)]
    print(f"{args.layout} prefill {args.context}{' (before)' if args.before else ''}: wall {', '.join(f'{w:.1f}' for w in walls)} ms")
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with torch.profiler.profile(activities=acts) as prof:
        wall = prefill(args.context)
    gpu_us, cpu_us = {}, {}
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            gpu_us[ev.name] = gpu_us.get(ev.name, 0.0) + ev.device_time_total
        else:
            cpu_us[ev.name] = cpu_us.get(ev.name, 0.0) + ev.self_cpu_time_total
    print(f"profiled prefill: wall {wall:.1f} ms, GPU kernel time {sum(gpu_us.values()) / 1e3:.1f} ms")
    for title, table in (("GPU kernels", gpu_us), ("host ops by self CPU time", cpu_us)):
        print(f"-- {title}")
        for name, us in sorted(table.items(), key=lambda x: -x[1])[: args.top]:
            print(f"  {us / 1e3:9.2f} ms  {name[:110]}")


if __name__ == "__main__":
    main()
