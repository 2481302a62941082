"""Where the one-token MoE's time goes: two launches against the persistent launch, and each product alone.

The decode benchmark's MoE layer (bf16, 16 experts top-8 + 1 shared, D 2304, I 1024; the folded norm and
residual, the shared slots before the PDL wait), replayed from a CUDA graph of 16 calls back to back on
two alternating weight sets (254 MB, five times the L2), so that every call reads cold weights. Rows:

* the two launches (``gate_up_one`` + ``down_one``) and the persistent launch, per launch table entry;
* each product alone: the two-launch kernels' ``gate_up_one`` (down skipped) and the persistent kernel's
  first phase (no count, no down), then the second phase alone after a first-phase launch (timed as the
  difference) -- the same bytes as the products' floors: 85.0 and 42.5 MB.

Every persistent row is gated against the two launches on the same tiles (equal to the bit, as the GPU
test checks) before it is timed. H100 only (PDL, bulk prefetch); prints a table and writes JSON lines.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiles", default="5,4,16,4,1,200;16,1,4,1,1,200;10,2,8,2,1,200;5,4,16,4,0,200",
                    help="persistent tables to time: progs_per_sm,num_warps,gu_rows,dn_rows,dn_prefetch,sleep_ns;...")
    ap.add_argument("--out", default=None, help="JSON lines file")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("moe_persistent_probe needs a CUDA GPU (Hopper: PDL and bulk prefetch)")
    import triton.testing

    from kimi_linear.ops import moe_decode as md

    dev, dt, E, D, I, k = torch.device("cuda"), torch.bfloat16, 16, 2304, 1024, 8  # noqa: E741
    torch.manual_seed(0)
    mk = lambda *s: torch.randn(*s, device=dev, dtype=dt) * s[-1] ** -0.5  # noqa: E731
    sets = []
    for _ in range(2):
        w1, w3, w2 = [mk(I, D) for _ in range(E)], [mk(I, D) for _ in range(E)], [mk(D, I) for _ in range(E)]
        sets.append((w1, w3, w2, ([mk(I, D)], [mk(I, D)], [mk(D, I)])))
    x = torch.randn(1, D, device=dev, dtype=dt) * 3
    res = torch.randn(1, D, device=dev, dtype=dt)
    nw = (torch.rand(D, device=dev) + 0.5).to(dt)
    idx, wts = torch.randperm(E, device=dev)[:k][None], torch.rand(1, k, device=dev)
    syncs = [md.ExpertSync() for _ in sets]
    bw = 3.0e12
    floors = {"both": 9 * 3 * I * D * 2 / bw * 1e6, "gate_up": 9 * 2 * I * D * 2 / bw * 1e6, "down": 9 * I * D * 2 / bw * 1e6}

    def call(i):
        w1, w3, w2, sh = sets[i % 2]
        return md.moe_decode(x, idx, wts, w1, w3, w2, shared=sh, norm_weight=nw, eps=1e-5, residual=res, x_ready=True,
                             sync=syncs[i % 2], backend="triton")

    def timed(calls=16) -> float:
        for i in range(2):
            call(i)
        torch.cuda.synchronize()
        return triton.testing.do_bench_cudagraph(lambda: [call(i) for i in range(calls)], rep=40) * 1e3 / calls

    class _Skip:  # stands in for a kernel that is not launched
        def __getitem__(self, grid):
            return lambda *a, **kw: None

    real_launch, kernels = md._launch_persistent, md._single_token_kernels()
    md._ONE_KERNELS = kernels

    def phases_only(p):
        def launch(a, c, d, s, nprog=None, phases=3):
            if p == 2:  # the second phase needs the first's h
                real_launch(a, c, d, s, nprog, 1)
            return real_launch(a, c, d, s, nprog, p)
        return launch

    rows = []

    def row(name, us, floor, **extra):
        rows.append(dict(name=name, us=round(us, 2), floor_us=round(floor, 2), **extra))
        print(f"{name:58s} {us:7.2f} us  ({floor / us:4.0%} of {bw / 1e12:.1f} TB/s)", flush=True)

    def set_tiles(pt):
        md.PERSISTENT_TILE.update(pt)
        md.TILES["gate_up_one"] = dict(base_gu, BLOCK_R=pt["gu_rows"], num_warps=pt["num_warps"])
        md.TILES["down_one"] = dict(base_dn, BLOCK_R=pt["dn_rows"], num_warps=pt["num_warps"])

    base_gu, base_dn, base_pt = dict(md.TILES["gate_up_one"]), dict(md.TILES["down_one"]), dict(md.PERSISTENT_TILE)
    md.PERSISTENT_ONE = False
    row("two launches (default tiles)", timed(), floors["both"])
    md._ONE_KERNELS = (kernels[0], _Skip(), kernels[2])
    row("  gate_up_one alone", timed(), floors["gate_up"])
    md._ONE_KERNELS = kernels
    for spec in args.tiles.split(";"):
        p, w, gr, dr, pf, sl = (int(v) for v in spec.split(","))
        pt = dict(progs_per_sm=p, num_warps=w, gu_rows=gr, dn_rows=dr, dn_prefetch=pf, sleep_ns=sl)
        set_tiles(pt)
        md.PERSISTENT_ONE = False
        want = call(0).clone()
        two = timed()
        md.PERSISTENT_ONE = True
        got = call(0)
        if not torch.equal(got, want) or syncs[0].counters.any():
            print(f"persistent {pt}: differs from the two launches on its tiles, not timed", flush=True)
            continue
        tag = f"p{p} w{w} rows {gr}/{dr} pf{pf} sleep{sl}"
        row(f"two launches, {tag}", two, floors["both"])
        both = timed()
        row(f"persistent, {tag}", both, floors["both"], **pt)
        md._launch_persistent = phases_only(1)
        first = timed()
        row("  its gate/up phase alone", first, floors["gate_up"])
        md._launch_persistent = phases_only(2)
        row("  its down phase alone (after a gate/up launch, difference)", timed() - first, floors["down"])
        md._launch_persistent = real_launch
    md.TILES["gate_up_one"], md.TILES["down_one"] = base_gu, base_dn
    md.PERSISTENT_TILE.update(base_pt)
    if args.out:
        with open(args.out, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}", file=sys.stderr)


if __name__ == "__main__":
    main()
