"""Per-kernel GPU time of our chunk_kda (fwd + bwd) at one shape, from torch.profiler.

    PYTHONPATH=. python benchmarks/chunk_kda_stages.py --T 65536 [--fused]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from chunk_kda_timing import make, ours  # noqa: E402

from kimi_linear.bench.common import kernel_times  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, default=65536)
    ap.add_argument("--H", type=int, default=16)
    ap.add_argument("--fused", action="store_true")
    args = ap.parse_args()
    inp, extra = make(args.T, args.H, 128, args.fused)
    for x in list(inp.values()) + list(extra.values()):
        x.requires_grad_(True)
    f = ours(inp, extra, args.fused)
    do = torch.randn(1, args.T, args.H, 128, device="cuda", dtype=torch.bfloat16)
    tot = {name: ms for name, (ms, _) in kernel_times(lambda: f().backward(do), torch.device("cuda"), reps=5).items()}
    print(f"per-kernel ms (T={args.T}, H={args.H}, fused={args.fused}):")
    for name, ms in sorted(tot.items(), key=lambda x: -x[1]):
        print(f"  {ms:8.3f}  {name[:90]}")
    print(f"  {sum(tot.values()):8.3f}  TOTAL")


if __name__ == "__main__":
    main()
