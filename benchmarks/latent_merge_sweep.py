"""Launch sweep of the split-KV merge alone (``latent_attention_triton._merge_splits``) on a GPU.

At batch 1 the decode step's latent attention leaves ``S`` per-split contexts ``[S, 32, 512]`` fp32 and
log-sum-exps in L2 (S = 64 at 4K keys, 128-132 from 64K on); the merge turns them into the context.
Every setting -- the chunked kernel, or the one-pass kernel at a tile size and warp count
(``MERGE_TILES``) -- must match the merge in float64 (relative RMS < 1e-2 in bf16) before it is timed.
Times: one CUDA graph of ``--calls`` merges back to back over the same partials (they stay in L2, as in
the step), per call. The floor is the partials' bytes over the L2 read rate, which this script does not
measure; the step's own numbers come from ``decode_profile.py --ab``.

    PYTHONPATH=. python benchmarks/latent_merge_sweep.py [--splits 64 129 132] [--calls 50]
"""

from __future__ import annotations

import argparse
import json

import torch

M, R = 32, 512
SETTINGS = ([dict(one_pass=False)]
            + [dict(one_pass=True, block_r=r, num_warps=w) for r in (16, 32, 64, 128) for w in (2, 4, 8)])


def partials(S: int, dev: torch.device, seed: int = 0):
    """Per-split contexts and log-sum-exps with the spread a long context's splits have (lse within ~8)."""
    g = torch.Generator(device=dev).manual_seed(seed)
    o = torch.randn(1, S, M, R, generator=g, device=dev) * 0.1
    lse = 5.0 + 2.0 * torch.randn(1, S, M, generator=g, device=dev)
    return o, lse


def reference(o: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    w = torch.softmax(lse.double(), dim=1)  # [1, S, M]
    return torch.einsum("bsm,bsmr->bmr", w, o.double())


def time_setting(lt, setting: dict, o, lse, calls: int) -> tuple[float, float]:
    """(us per merge from a graph of ``calls`` merges, relative RMS against float64)."""
    from tests.numerics import rel_rms

    lt.MERGE_ONE_PASS = setting["one_pass"]
    lt.MERGE_TILES.update({k: v for k, v in setting.items() if k != "one_pass"})
    out = torch.full((1, M, R), float("nan"), device=o.device, dtype=torch.bfloat16)  # poisoned
    lt._merge_splits(o, lse, out)
    torch.cuda.synchronize()
    err = rel_rms(out.double(), reference(o, lse))
    if not err < 1e-2:
        return float("nan"), err
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            for _ in range(calls):
                lt._merge_splits(o, lse, out)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000 / calls)
    return sorted(times)[len(times) // 2], err


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--splits", type=int, nargs="+", default=[64, 129, 132])
    ap.add_argument("--calls", type=int, default=50)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("latent_merge_sweep.py needs a CUDA GPU")
    from kimi_linear.ops import latent_attention_triton as lt

    dev = torch.device("cuda")
    saved = (lt.MERGE_ONE_PASS, dict(lt.MERGE_TILES))
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; M={M} rows, R={R}, graph of {args.calls} merges")
    for S in args.splits:
        o, lse = partials(S, dev)
        for setting in SETTINGS:
            us, err = time_setting(lt, setting, o, lse, args.calls)
            row = dict(S=S, **setting, us=round(us, 2), rel_err=float(f"{err:.2e}"))
            print(json.dumps(row))
            lt.MERGE_ONE_PASS, lt.MERGE_TILES = saved[0], dict(saved[1])


if __name__ == "__main__":
    main()
