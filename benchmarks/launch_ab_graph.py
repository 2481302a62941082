"""A/B of chunked-KDA launch-table settings in GPU time: each variant gated, then timed replayed from a
CUDA graph, the variants alternating over rounds so that clock drift hits them alike.

The kernel sweep (chunk_kda_sweep.py) times one kernel at a time; a setting that removes a launch
(the merged prologue / epilogue) saves most of its time between kernels, which only the whole call,
replayed from a graph, shows. Each variant is a list of ``ENTRY.KEY=INT`` edits of
``chunk_common.LAUNCH``; ``base`` is the table as committed.

    PYTHONPATH=. python benchmarks/launch_ab_graph.py --shape 1x4096x16 \
        --variant base --variant gate.merge_l2norm=1 [--provider ours_fused] [--rounds 3] [--preflight]

A kernel fault (an illegal address) ends the process's CUDA context and with it every later row
(session 18 lost two runs to one variant so). ``--preflight`` first runs each variant other than base
once per shape and mode in a child process and drops, with the child's last error line, the ones whose
child fails or hangs.

``--profile`` prints, before the timed rounds, each (shape, mode)'s per-kernel GPU time (torch.profiler,
one eager call) under every variant side by side: which kernels a setting moved.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

import torch


def parse_variant(spec: str) -> dict[str, dict[str, int]]:
    """``"a.b=1,c.d=0"`` -> ``{"a": {"b": 1}, "c": {"d": 0}}`` (launch-table edits for
    ``chunk_common.launch_overrides``); ``"base"`` -> {}. Malformed parts and names the table does not
    have are refused here, before any device work."""
    from kimi_linear.ops.kda.chunk_common import LAUNCH

    if spec == "base":
        return {}
    edits: dict[str, dict[str, int]] = {}
    for part in spec.split(","):
        key, sep, value = part.partition("=")
        entry, dot, field = key.partition(".")
        if not sep or not dot or not value.lstrip("-").isdigit():
            raise SystemExit(f"variant part {part!r} is not ENTRY.KEY=INT")
        if entry not in LAUNCH or field not in LAUNCH[entry]:
            raise SystemExit(f"launch table has no {entry}.{field}")
        edits.setdefault(entry, {})[field] = int(value)
    return edits


def preflight(variants: dict, argv_common: list[str], timeout: float, run=subprocess.run) -> dict:
    """The variants whose check child (this script with ``--check``: one eager call per shape and mode,
    synchronised) exits cleanly within ``timeout`` seconds; base is kept unchecked. Each dropped one is
    reported with the child's last error line."""
    keep = {}
    for name, edits in variants.items():
        if name == "base":
            keep[name] = edits
            continue
        cmd = [sys.executable, __file__, "--check", "--variant", name, *argv_common]
        try:
            done = run(cmd, capture_output=True, text=True, timeout=timeout)
            why = None if done.returncode == 0 else (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
        except subprocess.TimeoutExpired:
            why = f"no answer in {timeout:.0f} s"
        if why is None:
            keep[name] = edits
        else:
            print(f"preflight: variant {name} dropped: {why}", flush=True)
    return keep


def check(p, shapes, modes, variants, device) -> None:
    """One eager call of each (shape, mode) under each variant, synchronised (the preflight's child)."""
    from kimi_linear.bench import kda
    from kimi_linear.ops.kda.chunk_common import launch_overrides

    for edits in variants.values():
        with launch_overrides(edits):
            for shape in shapes:
                leaves = kda.make_leaves(p.setting, shape, dtype=torch.bfloat16, device=device)
                for mode in modes:
                    kda._timed_fn(p, leaves, mode)()
                torch.cuda.synchronize(device)


def profile(p, shape, mode, variants, device) -> str:
    """Per-kernel ms of one eager call of ``p`` at (shape, mode) under each variant, one column each, with
    the last column minus the first; a kernel a variant does not launch shows as 0."""
    from kimi_linear.bench import kda
    from kimi_linear.bench.common import kernel_times
    from kimi_linear.ops.kda.chunk_common import launch_overrides

    cols = {}
    for name, edits in variants.items():
        with launch_overrides(edits):
            leaves = kda.make_leaves(p.setting, shape, dtype=torch.bfloat16, device=device)
            cols[name] = {k: ms for k, (ms, _) in kernel_times(kda._timed_fn(p, leaves, mode), device).items()}
    names = sorted(set().union(*cols.values()), key=lambda k: -max(c.get(k, 0.0) for c in cols.values()))
    first, last = next(iter(cols)), list(cols)[-1]
    head = f"{'kernel (' + shape.key + ' ' + mode + ', ms)':48s}" + "".join(f"{v[:22]:>24s}" for v in cols) + f"{'last - first':>14s}"
    rows = [head]
    for k in names + ["total"]:
        vals = {v: (sum(c.values()) if k == "total" else c.get(k, 0.0)) for v, c in cols.items()}
        rows.append(f"{k[:48]:48s}" + "".join(f"{vals[v]:24.4f}" for v in cols) + f"{vals[last] - vals[first]:+14.4f}")
    return "\n".join(rows)


def main() -> None:
    from kimi_linear.bench import kda
    from kimi_linear.bench.common import environment
    from kimi_linear.bench.registry import KDA_PROVIDERS
    from kimi_linear.ops.kda.chunk_common import launch_overrides

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", action="append", required=True, help="BxTxH or a named set (repeatable)")
    ap.add_argument("--variant", action="append", required=True, help="base or ENTRY.KEY=INT[,...] (repeatable)")
    ap.add_argument("--provider", default="ours_fused", choices=[n for n, p in KDA_PROVIDERS.items() if p.ours])
    ap.add_argument("--modes", default="fwd,fwdbwd")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--preflight", action="store_true", help="drop variants whose one-call check faults (child process)")
    ap.add_argument("--preflight-timeout", type=float, default=180.0, help="seconds per variant's check")
    ap.add_argument("--profile", action="store_true", help="per-kernel times of each variant first (torch.profiler)")
    ap.add_argument("--check", action="store_true", help=argparse.SUPPRESS)  # the preflight's child
    args = ap.parse_args()
    modes = args.modes.split(",")
    if any(m not in kda.MODES for m in modes) or args.rounds < 1:
        ap.error(f"--modes takes {','.join(kda.MODES)} (got {args.modes!r}); --rounds >= 1 (got {args.rounds})")
    try:
        shapes = [s for spec in args.shape for s in kda.parse_shapes(spec)]
    except ValueError as exc:
        ap.error(str(exc))
    variants = {spec: parse_variant(spec) for spec in args.variant}  # malformed specs fail before the GPU
    if not torch.cuda.is_available():
        raise SystemExit("launch_ab_graph.py times CUDA graphs: it needs a CUDA device")
    device = torch.device("cuda")
    p = KDA_PROVIDERS[args.provider]
    if args.check:
        check(p, shapes, modes, variants, device)
        return
    if args.preflight:
        common = ["--provider", args.provider, "--modes", args.modes] + [a for s in args.shape for a in ("--shape", s)]
        variants = preflight(variants, common, args.preflight_timeout)
    env = environment(device)
    if args.profile:
        for shape in shapes:
            for mode in modes:
                print(profile(p, shape, mode, variants, device), flush=True)
    for shape in shapes:
        spec = shape.key
        for mode in modes:
            times: dict[str, list[float]] = {v: [] for v in variants}
            refs: dict = {}
            for _ in range(args.rounds):
                for name, edits in variants.items():
                    with launch_overrides(edits):
                        rec = kda.bench_one(p, shape, mode, device=device, dtype=torch.bfloat16, env=env,
                                            warmup=25, rep=200, refs=refs, cuda_graph=True)
                    if not rec.ok:
                        raise SystemExit(f"{spec} {mode} {name}: {rec.status}")
                    times[name].append(rec.ms)
            base = statistics.median(next(iter(times.values())))
            for name, ts in times.items():
                med = statistics.median(ts)
                print(f"{spec:12s} {mode:6s} {name:40s} median {med:.4f} ms  ({med / base:.3f}x first)  "
                      f"rounds {' '.join(f'{t:.4f}' for t in ts)}")
                print(json.dumps({"shape": spec, "mode": mode, "variant": name, "provider": args.provider,
                                  "ms": ts, "gpu": env.get("gpu"), "src_sha": env.get("src_sha")}))


if __name__ == "__main__":
    main()
