"""Launch sweep of the absorbed-MLA decode kernel (split over the key axis + merge) on a GPU.

The decode benchmark's MLA geometry: 32 heads, 512-wide latent + 64-wide shared key part, bf16 cache,
one new token per sequence, at 4K..1M cached tokens. Every setting (``latent_attention_triton.TILES``)
must match :func:`kimi_linear.ops.latent_attention.latent_attention_ref` (fp32, relative RMS < 2e-2)
before it is timed; times are CUDA-graph replays (``do_bench_cudagraph``: decoding replays a graph) of
the whole call (query absorption, split kernel, merge, output projection). The floor is the cache bytes
the step must read (plus ``kv_b_proj``) over the measured copy bandwidth.

    PYTHONPATH=. python benchmarks/latent_attention_sweep.py [--shapes 1x4096 1x1048576] [--budget 240]
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import torch

from kimi_linear.bench.common import copy_bandwidth

H, DN, DR, DV, R = 32, 128, 64, 128, 512
SESSION6 = dict(block_n=32, num_warps=8, num_stages=2, head_groups=1, min_block_m=16, splits_per_sm=2)
BASE = dict(block_n=64, num_warps=8, num_stages=2, head_groups=1, min_block_m=16, splits_per_sm=2)
# round 2 (session 10, after 64-key tiles won round 1, ROUND1 below, at every context)
ROUND2 = (
    [dict(BASE)]
    + [dict(BASE, splits_per_sm=p) for p in (1, 3)]
    + [dict(BASE, head_groups=2, num_warps=w, num_stages=s, splits_per_sm=p)
       for w, s, p in ((4, 2, 1), (4, 2, 2), (8, 2, 1))]
    + [dict(BASE, block_n=128, num_stages=1), dict(BASE, block_n=128, num_stages=1, head_groups=2, num_warps=4)]
    + [dict(BASE, block_n=32, num_stages=3, head_groups=2, num_warps=4, splits_per_sm=1)]
)
# round 3 (session 11): one wave of programs. With 64-key tiles in two stages a program holds ~147 KB of
# shared memory, so one runs per SM: one split per SM and two row groups per split is two waves of
# programs; half as many splits (twice as long) is one, and half the partials for the merge
CURRENT = dict(block_n=64, num_warps=4, num_stages=2, head_groups=2, min_block_m=16, splits_per_sm=1)  # rows-major
ROUND3 = [dict(CURRENT), dict(CURRENT, splits_per_sm=0.5), dict(CURRENT, splits_per_sm=0.5, num_warps=8),
          dict(CURRENT, splits_per_sm=0.25)]
# round 4 (session 12): the keys-major kernel (products transposed so that the 64-key tile and the
# 512-wide latent are the M sides of Hopper's wgmma; one program per split holds all 32 query rows and
# reads each tile once; ~188 KB of shared memory, one program per SM)
# (keys_major_from=0: at every context; keys_major_rows=16: two programs per split)
KEYS_MAJOR = dict(CURRENT, keys_major_from=0, keys_major_rows=32)
ROUND4 = [dict(CURRENT), dict(KEYS_MAJOR, num_warps=4), dict(KEYS_MAJOR, num_warps=8),
          dict(KEYS_MAJOR, num_warps=8, splits_per_sm=2), dict(KEYS_MAJOR, num_warps=8, keys_major_rows=16)]
# round 5: keys-major with more tiles in flight per program (32-key tiles in 3 or 4 stages: the key
# product then falls back from wgmma's 64-row M; the context product keeps it)
ROUND5 = [dict(KEYS_MAJOR, num_warps=4), dict(KEYS_MAJOR, num_warps=4, block_n=32, num_stages=3),
          dict(KEYS_MAJOR, num_warps=4, block_n=32, num_stages=4), dict(KEYS_MAJOR, num_warps=4, splits_per_sm=2)]
# round 6 (session 23): the keys-major kernel's tiles through TMA (descriptors made on the device), in
# its tiles and in more, smaller stages, against both kernels' plain loads
KEYS_MAJOR_TMA = dict(KEYS_MAJOR, num_warps=4, keys_major_tma=1)
ROUND6 = [dict(CURRENT), dict(KEYS_MAJOR, num_warps=4), dict(KEYS_MAJOR_TMA),
          dict(KEYS_MAJOR_TMA, block_n=32, num_stages=4), dict(KEYS_MAJOR_TMA, num_warps=8),
          dict(KEYS_MAJOR_TMA, splits_per_sm=2)]
ROUND1 = (
    [dict(SESSION6)]
    + [dict(SESSION6, num_stages=s) for s in (3, 4)]
    + [dict(SESSION6, block_n=16, num_stages=3), dict(SESSION6, block_n=64)]
    # two programs per split, 16 rows each: half the accumulator and query registers
    + [dict(SESSION6, head_groups=2, num_warps=w, num_stages=s, block_n=bn)
       for w, s, bn in ((4, 2, 32), (4, 3, 32), (8, 3, 32), (4, 3, 64), (8, 2, 64))]
    # rows padded to 64: tl.dot may take wgmma (operands from shared memory, not registers)
    + [dict(SESSION6, min_block_m=64, num_warps=w, num_stages=s, block_n=bn)
       for w, s, bn in ((4, 2, 32), (8, 2, 32), (4, 3, 64), (8, 3, 64), (8, 2, 64))]
    + [dict(SESSION6, splits_per_sm=p) for p in (1, 4)]
    + [dict(SESSION6, head_groups=2, num_warps=4, num_stages=3, splits_per_sm=p) for p in (1, 4)]
)


def make(B: int, L: int, dev: torch.device, seed: int = 0):
    """Decode inputs: one new token's query per sequence against ``L`` cached latents, bf16."""
    g = torch.Generator(device=dev).manual_seed(seed)
    dt = torch.bfloat16
    q_nope = torch.randn(B, 1, H, DN, generator=g, device=dev).to(dt)
    q_rope = torch.randn(B, 1, H, DR, generator=g, device=dev).to(dt)
    # latents of the size an RMS-normalised latent has, so the softmax is neither flat nor one-hot
    latent = torch.randn(B, L, R, generator=g, device=dev).to(dt)
    k_rope = torch.randn(B, L, DR, generator=g, device=dev).to(dt)
    w_kv_b = (torch.randn(H * (DN + DV), R, generator=g, device=dev) * R**-0.5).to(dt)
    return q_nope, q_rope, latent, k_rope, w_kv_b


def reference(args, lengths) -> torch.Tensor:
    """fp32 reference, one sequence at a time (the scores of a 1M-token row are 128 MB)."""
    from kimi_linear.ops.latent_attention import latent_attention_ref

    outs = [latent_attention_ref(*(a[b:b + 1].float() if a.dim() > 2 else a.float() for a in args),
                                 lengths=lengths[b:b + 1]) for b in range(lengths.shape[0])]
    return torch.cat(outs)


def main() -> None:
    import triton.testing

    from kimi_linear.ops import latent_attention_triton as lt

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="+", default=["1x4096", "1x131072", "1x1048576", "6x1048576"],
                    help="BATCHxCONTEXT")
    ap.add_argument("--budget", type=float, default=240.0, help="seconds for the whole sweep")
    ap.add_argument("--round", type=int, default=4, choices=(1, 2, 3, 4, 5, 6), help="which candidate list")
    args_ns = ap.parse_args()
    dev = torch.device("cuda")
    bw = copy_bandwidth(dev)  # bytes/s
    print(f"{torch.cuda.get_device_name()}  copy {bw / 1e12:.2f} TB/s  torch {torch.__version__}", flush=True)
    base = dict(lt.TILES)
    t0 = time.time()
    for i_shape, shape in enumerate(args_ns.shapes):
        B, L = (int(v) for v in shape.split("x"))
        inp = make(B, L, dev)
        lengths = torch.full((B,), L, device=dev, dtype=torch.int64)
        ref = reference(inp, lengths)
        cache_bytes = B * L * (R + DR) * 2 + inp[-1].numel() * 2
        floor_us = cache_bytes / bw * 1e6
        print(f"== B={B} context={L}: reads {cache_bytes / 1e6:.1f} MB, floor {floor_us:.1f} us", flush=True)
        deadline = t0 + args_ns.budget * (i_shape + 1) / len(args_ns.shapes)
        rows = []
        for cand in {1: ROUND1, 2: ROUND2, 3: ROUND3, 4: ROUND4, 5: ROUND5, 6: ROUND6}[args_ns.round]:
            if time.time() > deadline:
                print("   (budget reached)", flush=True)
                break
            lt.TILES.clear()
            lt.TILES.update(cand)
            step = functools.partial(lt.latent_attention_triton, *inp, lengths=lengths)
            try:
                out = step()
                err = ((out.float() - ref).pow(2).mean() / ref.pow(2).mean()).sqrt().item()
                us = triton.testing.do_bench_cudagraph(step, rep=40) * 1e3 if err < 2e-2 else float("nan")
            except Exception as e:  # a setting that does not compile (shared memory) is reported, not fatal
                err, us = float("nan"), float("nan")
                print(f"   {cand}: {type(e).__name__}: {str(e).splitlines()[0][:120]}", flush=True)
            rows.append((us, cand))
            print(f"   {json.dumps(cand)}  {us:8.1f} us  ({floor_us / us if us == us else 0:.0%} of floor rate)  "
                  f"rel err {err:.1e}", flush=True)
        done = sorted((r for r in rows if r[0] == r[0]), key=lambda r: r[0])
        if done:
            print(f"-> best {json.dumps(done[0][1])} {done[0][0]:.1f} us (base {rows[0][0]:.1f}, floor {floor_us:.1f})",
                  flush=True)
        del inp, ref
        torch.cuda.empty_cache()
    lt.TILES.clear()
    lt.TILES.update(base)


if __name__ == "__main__":
    main()
