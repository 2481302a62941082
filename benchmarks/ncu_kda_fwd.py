"""One forward (or backward) of our chunk_kda and of FLA's exact chunk_kda, bracketed for Nsight Compute.

Compiles and warms both first, then opens the CUDA profiler range around one forward of each (with
``--backward``: one backward, its forward run before the range opens), so
``ncu --profile-from-start off`` sees only those kernels:

    ncu --clock-control none --profile-from-start off --section SpeedOfLight --section Occupancy \\
        --section WarpStateStats python3 benchmarks/ncu_kda_fwd.py --T 65536
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from chunk_kda_timing import fla_provider, make, ours  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--B", type=int, default=1)
    ap.add_argument("--T", type=int, default=65536)
    ap.add_argument("--H", type=int, default=16)
    ap.add_argument("--fla", action="store_true", help="also FLA's forward")
    ap.add_argument("--backward", action="store_true", help="profile the backward (the forward runs outside the range)")
    ap.add_argument("--fused", action="store_true", help="the layer-fused options (l2norm, softplus gate, beta sigmoid)")
    ap.add_argument("--launch", default="{}", help='launch-table overrides, e.g. \'{"gram_diag": {"levels": 1}}\'')
    args = ap.parse_args()
    from kimi_linear.ops.kda import chunk_common

    for name, cfg in json.loads(args.launch).items():
        chunk_common.LAUNCH[name] = {**chunk_common.LAUNCH[name], **cfg}

    inp, extra = make(args.T, args.H, 128, fused=args.fused, B=args.B)
    if args.backward:
        for x in (*inp.values(), *extra.values()):
            x.requires_grad_(True)
    fwds = {"ours": ours(inp, extra, args.fused)}
    if args.fla:
        fwds["fla"] = fla_provider(inp, extra, args.fused)
    do = torch.randn_like(inp["v"])

    def run(fwd, profiled: bool) -> None:
        if not args.backward:
            if profiled:
                torch.cuda.cudart().cudaProfilerStart()
            fwd()
        else:
            for x in (*inp.values(), *extra.values()):
                x.grad = None  # (accumulating into the warm-up's gradients would add PyTorch add kernels)
            o = fwd()
            torch.cuda.synchronize()
            if profiled:
                torch.cuda.cudart().cudaProfilerStart()
            o.backward(do)
        torch.cuda.synchronize()
        if profiled:
            torch.cuda.cudart().cudaProfilerStop()

    for fwd in fwds.values():  # compile, autotune, warm
        for _ in range(3):
            run(fwd, False)
    for fwd in fwds.values():
        run(fwd, True)


if __name__ == "__main__":
    main()
