"""One forward of our chunk_kda and of FLA's exact chunk_kda, bracketed for Nsight Compute.

Compiles and warms both first, then opens the CUDA profiler range around one forward of each, so
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
from chunk_kda_timing import make  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--B", type=int, default=1)
    ap.add_argument("--T", type=int, default=65536)
    ap.add_argument("--H", type=int, default=16)
    ap.add_argument("--fla", action="store_true", help="also FLA's forward")
    ap.add_argument("--launch", default="{}", help='launch-table overrides, e.g. \'{"gram_diag": {"levels": 1}}\'')
    args = ap.parse_args()
    from kimi_linear.ops.kda import chunk_common
    from kimi_linear.ops.kda.chunk import chunk_kda

    for name, cfg in json.loads(args.launch).items():
        chunk_common.LAUNCH[name] = {**chunk_common.LAUNCH[name], **cfg}

    inp, _ = make(args.T, args.H, 128, fused=False, B=args.B)
    fns = {"ours": lambda: chunk_kda(*inp.values(), backend="triton")[0]}
    if args.fla:
        from fla.ops.kda import chunk_kda as fla_chunk_kda

        fns["fla"] = lambda: fla_chunk_kda(*inp.values())[0]
    for fn in fns.values():  # compile, autotune, warm
        for _ in range(3):
            fn()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    for fn in fns.values():
        fn()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


if __name__ == "__main__":
    main()
