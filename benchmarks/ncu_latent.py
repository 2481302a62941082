"""One absorbed-MLA decode call (split kernel + merge) at a long context, bracketed for Nsight Compute.

Warms the call first (compilation), then opens the CUDA profiler range around one call, so
``ncu --profile-from-start off`` sees only its kernels (inputs as ``latent_attention_sweep.py``'s):

    ncu --profile-from-start off --section SpeedOfLight --section MemoryWorkloadAnalysis \\
        --section WarpStateStats python3 benchmarks/ncu_latent.py --context 131072
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from latent_attention_sweep import make  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=131072)
    ap.add_argument("--tiles", default="{}", help='latent_attention_triton.TILES overrides, e.g. \'{"block_n": 32}\'')
    args = ap.parse_args()
    from kimi_linear.ops import latent_attention_triton as lt

    lt.TILES.update(json.loads(args.tiles))
    dev = torch.device("cuda")
    inp = make(args.batch, args.context, dev)
    lengths = torch.full((args.batch,), args.context, device=dev, dtype=torch.int64)
    for _ in range(3):
        lt.latent_attention_triton(*inp, lengths=lengths)
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    lt.latent_attention_triton(*inp, lengths=lengths)
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
    print(f"latent call: B={args.batch} context={args.context} tiles={json.dumps(lt.TILES)}")


if __name__ == "__main__":
    main()
