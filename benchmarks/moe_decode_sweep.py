"""Tile / launch sweep of the MoE decode kernels at the decode benchmark's geometry, on a GPU.

16 experts of SwiGLU 2304 -> 1024 -> 2304, top-8, bf16, batch 1. Each setting must match the
reference (:func:`kimi_linear.ops.moe.grouped_swiglu`, relative error < 1e-2) before it is timed
(``triton.testing.do_bench_cudagraph``: the step is CUDA-graphed when decoding). Prints the time per
setting against the floor (the chosen experts' weight bytes over the measured copy bandwidth).

    PYTHONPATH=. python benchmarks/moe_decode_sweep.py
"""

from __future__ import annotations

import functools
import itertools
import json

import torch

from kimi_linear.bench.common import copy_bandwidth


def main() -> None:
    import triton.testing

    from kimi_linear.ops import moe_decode as md
    from kimi_linear.ops.moe import grouped_swiglu

    torch.manual_seed(0)
    dev, dt = torch.device("cuda"), torch.bfloat16
    E, D, I, k = 16, 2304, 1024, 8
    w1 = [torch.randn(I, D, device=dev, dtype=dt) * D**-0.5 for _ in range(E)]
    w3 = [torch.randn(I, D, device=dev, dtype=dt) * D**-0.5 for _ in range(E)]
    w2 = [torch.randn(D, I, device=dev, dtype=dt) * I**-0.5 for _ in range(E)]
    bw = copy_bandwidth(dev)  # bytes/s
    base = {n: dict(c) for n, c in md.TILES.items()}
    gate_up = [dict(BLOCK_I=bi, BLOCK_D=bd, num_warps=w, num_stages=s)
               for bi, bd, w, s in itertools.product((16, 32, 64), (64, 128, 256), (2, 4), (4,))]
    down = [dict(BLOCK_D=bd, BLOCK_I=bi, num_warps=w, num_stages=s)
            for bd, bi, w, s in itertools.product((16, 32, 64), (64, 128, 256), (2, 4), (4,))]
    report = {"device": torch.cuda.get_device_name(), "copy_tbps": bw / 1e12, "rows": []}
    for N in (1,):
        x = torch.randn(N, D, device=dev, dtype=dt)
        idx = torch.stack([torch.randperm(E, device=dev)[:k] for _ in range(N)])
        wts = torch.rand(N, k, device=dev)
        ref = grouped_swiglu(x.float(), idx, wts, [w.float() for w in w1], [w.float() for w in w3],
                             [w.float() for w in w2])
        chosen = len(set(idx.flatten().tolist()))
        step = functools.partial(md.moe_decode, x, idx, wts, w1, w3, w2, backend="triton")
        floor_us = chosen * 3 * I * D * 2 / bw * 1e6
        for name, cands in (("gate_up", gate_up), ("down", down)):
            best = None
            for cand in cands:
                md.TILES.update({n: dict(c) for n, c in base.items()})
                md.TILES[name] = cand
                try:
                    err = ((step().float() - ref).norm() / ref.norm()).item()
                    us = triton.testing.do_bench_cudagraph(step, rep=30) * 1e3
                except Exception as e:  # noqa: BLE001 (settings that do not fit are skipped)
                    print(f"N={N} {name} {cand}: {type(e).__name__}")
                    continue
                ok = err < 1e-2
                report["rows"].append(dict(N=N, kernel=name, **cand, us=us, err=err, ok=ok))
                if ok and (best is None or us < best[0]):
                    best = (us, cand)
            md.TILES.update({n: dict(c) for n, c in base.items()})
            if best:
                print(f"N={N} {name}: best {best[1]} -> whole MoE {best[0]:.1f} us (floor {floor_us:.1f} us for "
                      f"{chosen} experts' weights)", flush=True)
        md.TILES.update({n: dict(c) for n, c in base.items()})
        step()
        us = triton.testing.do_bench_cudagraph(step, rep=30) * 1e3
        print(f"N={N} current settings: whole MoE {us:.1f} us, floor {floor_us:.1f} us", flush=True)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
