"""``kimi-linear bench``: kernel benchmarks with a correctness gate (kimi_linear/bench).

  kimi-linear bench kda         [--shapes fig2|train|all|BxTxH,...] [--providers a,b] [--modes fwd,fwdbwd]
  kimi-linear bench kda-decode  [--batches 1,16,64,256] [--heads 32] [--sweep]
  kimi-linear bench report      FILE.jsonl ...   (merge runs: one table, markdown and plot)

Each prints a human table, then one JSON line; with ``--out DIR`` (default benchmarks/results) it
writes ``<bench>_<tag>.jsonl``, ``.md`` and ``.png``. Without a CUDA device, or with ``--smoke``, it
runs a tiny CPU smoke configuration with the reference provider.
"""

from __future__ import annotations

import argparse
import sys


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bench", help="kernel benchmarks (KDA chunked, KDA decode) with correctness gates")
    sub = p.add_subparsers(dest="bench_command", metavar="BENCH")

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--out", default="benchmarks/results", help="directory for JSONL/markdown/PNG ('' = none)")
        q.add_argument("--tag", default=None, help="file name tag (default: <gpu>_<UTC time>)")
        q.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
        q.add_argument("--warmup", type=int, default=25, help="do_bench warm-up (ms)")
        q.add_argument("--rep", type=int, default=100, help="do_bench repetition time (ms)")
        q.add_argument("--smoke", action="store_true", help="tiny CPU run with the reference provider (CI)")
        q.add_argument("--no-plot", action="store_true")

    k = sub.add_parser("kda", help="chunked KDA: ours vs FLA (KDA, GDN, DPLR) vs flash attention")
    common(k)
    k.add_argument("--shapes", default="all", help="fig2, train, all, smoke, or BxTxH[xK] list (comma separated)")
    k.add_argument("--providers", default=None, help="comma list (default: all but 'reference'); see --list")
    k.add_argument("--modes", default="fwd,fwdbwd", help="fwd, fwdbwd")
    k.add_argument("--list", action="store_true", help="list providers and exit")
    k.add_argument("--cuda-graph", action="store_true",
                   help="time every provider's call replayed from a CUDA graph (GPU time without the host's "
                        "launch path, as a captured training step runs; short inputs are host-bound otherwise)")
    k.add_argument("--profile", action="store_true",
                   help="also each timed row's per-kernel times (torch.profiler), in the JSONL and the markdown")
    k.set_defaults(handler=run_kda)

    d = sub.add_parser("kda-decode", help="KDA decode step: recurrent kernel, state pool in place")
    common(d)
    d.add_argument("--batches", default="1,16,64,256")
    d.add_argument("--heads", type=int, default=32)
    d.add_argument("--head-dim", type=int, default=128)
    d.add_argument("--tokens", type=int, default=1, help="tokens per sequence per step")
    d.add_argument("--providers", default=None, help="comma list (default: ours,fla)")
    d.add_argument("--sweep", action="store_true", help="also time our kernel at every tile in the sweep")
    d.set_defaults(handler=run_decode)

    r = sub.add_parser("report", help="merge JSONL result files into one table, markdown and plot")
    r.add_argument("files", nargs="+")
    r.add_argument("--out", default="benchmarks/results")
    r.add_argument("--tag", default="merged")
    r.set_defaults(handler=run_report)

    from kimi_linear.commands.bench_decode import register_decode  # whole-model decode (generation area)

    register_decode(sub)
    p.set_defaults(handler=lambda args: (p.print_help(), 0)[1])


def _setup(args: argparse.Namespace):
    import torch

    from kimi_linear.bench.common import environment

    smoke = args.smoke or not torch.cuda.is_available()
    if smoke and not args.smoke:
        print("no CUDA device: running the CPU smoke configuration (--smoke)", file=sys.stderr)
    device = torch.device("cpu" if smoke else "cuda")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    if smoke:
        dtype = torch.float32
    env = environment(device)
    env["dtype"] = str(dtype).replace("torch.", "")
    return smoke, device, dtype, env


def _writer(bench: str, args, env):
    """Per-record JSONL appender (None without --out); fixes the run's tag on ``args``."""
    from kimi_linear.bench.common import JsonlWriter, run_tag

    if not args.out:
        return None
    args.tag = args.tag or run_tag(env)
    return JsonlWriter(args.out, bench, args.tag, env)


def _finish(bench: str, args, env, records, table: str, md: str, plot) -> int:
    from kimi_linear.bench.common import json_line, write_results

    print(table)
    paths: dict[str, str] = {}
    if args.out:
        tag = args.tag
        paths = write_results(args.out, bench, tag, env, records, md)
        if not getattr(args, "no_plot", False):
            try:
                png = plot(f"{args.out}/{bench}_{tag}.png")
                if png:
                    paths["png"] = png
            except Exception as exc:  # noqa: BLE001 - a missing matplotlib must not lose the results
                print(f"plot skipped: {type(exc).__name__}: {exc}", file=sys.stderr)
        print("wrote " + ", ".join(paths.values()), file=sys.stderr)
    print(json_line(bench, env, records))
    return 0


def run_kda(args: argparse.Namespace) -> int:
    from kimi_linear.bench import kda
    from kimi_linear.bench.plot import plot_kda
    from kimi_linear.bench.registry import DEFAULT_KDA_PROVIDERS, KDA_PROVIDERS

    if args.list:
        for p in KDA_PROVIDERS.values():
            print(f"{p.name:14s} [{p.setting}] {p.description}")
        return 0
    smoke, device, dtype, env = _setup(args)
    if args.cuda_graph:
        if device.type != "cuda":
            print("--cuda-graph needs a CUDA device", file=sys.stderr)
            return 2
        env["timing"] = "each call replayed from a CUDA graph"
    shapes = kda.parse_shapes("smoke" if smoke and args.shapes == "all" else args.shapes)
    providers = _csv(args.providers) if args.providers else (["reference"] if smoke else list(DEFAULT_KDA_PROVIDERS))
    modes = _csv(args.modes)
    print(f"KDA benchmark on {env.get('gpu') or device} ({env['dtype']}): {len(shapes)} shapes x {modes} x {providers}",
          file=sys.stderr)
    records = kda.run(shapes, providers, modes, device=device, dtype=dtype, env=env, warmup=args.warmup,
                      rep=args.rep, log=lambda s: print(s, file=sys.stderr, flush=True),
                      on_record=_writer("kda", args, env), cuda_graph=args.cuda_graph, profile=args.profile)
    return _finish("kda", args, env, records, kda.table(records), kda.markdown(env, records),
                   lambda path: plot_kda(records, path, title=f"KDA kernels, {env.get('gpu') or device}, "
                                         + ("replayed from a CUDA graph" if args.cuda_graph else "eager")))


def run_decode(args: argparse.Namespace) -> int:
    from kimi_linear.bench import decode
    from kimi_linear.bench.plot import plot_decode
    from kimi_linear.bench.registry import DEFAULT_DECODE_PROVIDERS

    smoke, device, dtype, env = _setup(args)
    batches = [int(b) for b in _csv(args.batches)]
    heads, dim = args.heads, args.head_dim
    if smoke and args.batches == "1,16,64,256":
        batches, heads, dim = [1, 3], 2, 16
    providers = _csv(args.providers) if args.providers else (["reference"] if smoke else list(DEFAULT_DECODE_PROVIDERS))
    print(f"KDA decode benchmark on {env.get('gpu') or device}: B={batches}, H={heads}, K=V={dim}, T={args.tokens}",
          file=sys.stderr)
    records = decode.run(batches, providers, H=heads, K=dim, V=dim, T=args.tokens, device=device, dtype=dtype,
                         env=env, sweep=args.sweep and not smoke, warmup=args.warmup, rep=args.rep,
                         log=lambda s: print(s, file=sys.stderr, flush=True),
                         on_record=_writer("kda-decode", args, env))
    copy = env.get("copy_tbps")
    return _finish("kda-decode", args, env, records, decode.table(records), decode.markdown(env, records),
                   lambda path: plot_decode(records, path, float(copy) if copy else None,
                                            title=f"KDA decode, H={heads}, K=V={dim}, {env.get('gpu') or device}"))


def run_report(args: argparse.Namespace) -> int:
    from kimi_linear.bench import decode, kda
    from kimi_linear.bench.common import read_jsonl, write_results
    from kimi_linear.bench.plot import plot_decode, plot_kda

    envs, records = read_jsonl(args.files)
    if not records:
        print("no records in the given files", file=sys.stderr)
        return 1
    env = envs[0]
    for name, mod in (("kda", kda), ("kda-decode", decode)):
        rows = [r for r in records if r.bench == name]
        if not rows:
            continue
        if name == "kda":
            kda.add_ratios(rows)
        print(mod.table(rows))
        write_results(args.out, name, args.tag, env, rows, mod.markdown(env, rows))
        path = f"{args.out}/{name}_{args.tag}.png"
        if name == "kda":
            plot_kda(rows, path)
        else:
            plot_decode(rows, path, float(env["copy_tbps"]) if env.get("copy_tbps") else None)
    return 0
