"""Relative RMS error of every output and gradient of chunk_kda (layer-fused path: l2norm, raw gate
with A_log / dt_bias, beta sigmoid) against the fp64 reference, for launch-table variants.

The benchmark's correctness gate found the fused gate's dA_log ~10x further from the reference than
FLA's in bf16 (docs/kernels.md); this script measures where such errors come from by switching one
setting at a time (e.g. 3-pass tf32 dots in a backward kernel). Needs a GPU for bf16 (Triton's
interpreter computes bf16 dots wrongly); fp16 / fp32 also run on the CPU interpreter.

    PYTHONPATH=. python benchmarks/kda_grad_precision.py --T 512 --H 16 \\
        --variant single_pass '{"decay_grad": {"precise": 0}}' --variant default '{}'
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from chunk_kda_timing import make  # noqa: E402


def run(inp, extra, do, dtype, fn, **kw):
    from kimi_linear.ops.kda.fusion import KDAFusion

    xs = {n: x.detach().to(dtype).requires_grad_() for n, x in inp.items()}
    pdt = torch.float64 if dtype == torch.float64 else torch.float32
    a_log = extra["A_log"].detach().to(pdt).requires_grad_()
    dt_bias = extra["dt_bias"].detach().to(pdt).requires_grad_()
    fusion = KDAFusion(qk_l2norm=True, beta_sigmoid=True, A_log=a_log, dt_bias=dt_bias)
    o, _ = fn(*xs.values(), fusion=fusion, **kw)
    (o.double() * do.double()).sum().backward()
    return {"o": o.detach(), **{"d" + n: x.grad for n, x in xs.items()}, "dA_log": a_log.grad, "ddt_bias": dt_bias.grad}


def main() -> None:
    if not torch.cuda.is_available():
        import tests.ops.conftest  # noqa: F401  (sets TRITON_INTERPRET=1 and patches the interpreter)
    from kimi_linear.ops.kda import chunk_common
    from kimi_linear.ops.kda.chunk import chunk_kda
    from kimi_linear.ops.kda.reference import chunk_kda_ref
    from tests.numerics import rel_rms

    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, default=512)
    ap.add_argument("--H", type=int, default=16)
    ap.add_argument("--B", type=int, default=1)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--variant", nargs=2, action="append", metavar=("NAME", "JSON"), default=[])
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    base = copy.deepcopy(chunk_common.LAUNCH)
    variants = args.variant or [["base", "{}"]]
    for seed in range(args.seeds):
        inp, extra = make(args.T, args.H, 128, True, dtype=torch.float32, device=dev, seed=seed, B=args.B)
        do = torch.randn(args.B, args.T, args.H, 128, device=dev, generator=torch.Generator(device=dev).manual_seed(seed + 7))
        ref = run(inp, extra, do, torch.float64, chunk_kda_ref)
        for name, cfg in variants:
            chunk_common.LAUNCH.clear()
            chunk_common.LAUNCH.update(copy.deepcopy(base))
            for k, v in json.loads(cfg).items():
                chunk_common.LAUNCH[k] = {**chunk_common.LAUNCH[k], **v}
            out = run(inp, extra, do, dtype, chunk_kda, backend="triton")
            errs = {n: round(rel_rms(out[n].double(), ref[n]), 5) for n in out}
            print(json.dumps({"seed": seed, "variant": name, "B": args.B, "T": args.T, "H": args.H, "dtype": args.dtype, **errs}),
                  flush=True)
    chunk_common.LAUNCH.clear()
    chunk_common.LAUNCH.update(base)


if __name__ == "__main__":
    main()
