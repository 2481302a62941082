"""Where one decode step's time goes: per-kernel GPU time of the decode-benchmark model (torch.profiler).

Builds the model of ``kimi-linear bench decode`` (released attention geometry, 16-expert top-8 MoE,
bf16, random weights), fills a batch-1 cache with ``--context`` random tokens' worth of state, and
profiles eager decode steps (graph replay hides the kernels from the profiler; the kernels are the
same). Prints the kernels by total GPU time, the sum, and the graph-replayed step time for comparison.

    PYTHONPATH=. python benchmarks/decode_profile.py --layout hybrid --context 4096
    PYTHONPATH=. python benchmarks/decode_profile.py --no-fold-norms   # the step before the norms were folded
    PYTHONPATH=. python benchmarks/decode_profile.py --compare-pdl     # graph-replayed step, PDL off / on
    PYTHONPATH=. python benchmarks/decode_profile.py --ab kimi_linear.layers.kda:FUSED_DECODE_STEP  # a switch off / on
"""

from __future__ import annotations

import argparse
import functools

import torch


@torch.no_grad()
def main() -> None:
    from kimi_linear.bench.common import kernel_sequence, kernel_times
    from kimi_linear.bench.model_decode import _fill_random_, bench_config, build_model, time_decode
    from kimi_linear.generation.cache import cache_for_config
    from kimi_linear.generation.generate import _model_dtype, forward_last_logits

    ap = argparse.ArgumentParser()
    ap.add_argument("--layout", default="hybrid")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--layers", type=int, default=27)
    ap.add_argument("--vocab", type=int, default=163840)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--sequence", type=int, default=0,
                    help="also list the first N kernels of one step in launch order with their times")
    ap.add_argument("--route-split-d", type=int, default=None,
                    help="the split router's slice width (0: one program per token); default: the library's")
    ap.add_argument("--no-fold-norms", action="store_true",
                    help="the step with an add + RMSNorm launch between sub-blocks instead of the norms and "
                         "residual adds folded into the kernels around them (modeling.FOLD_DECODE_NORMS)")
    ap.add_argument("--no-pdl", action="store_true",
                    help="launch the decode kernels without programmatic dependent launch (ops/pdl.py)")
    ap.add_argument("--compare-pdl", type=int, default=0, metavar="ROUNDS",
                    help="after the profile, time the graph-replayed step with PDL off, on, and on with the "
                         "shared experts started early (moe_decode.EARLY_SHARED_EXPERTS), in turn, ROUNDS times "
                         "each (one process, same model)")
    ap.add_argument("--ab", default=None, metavar="MODULE:FLAG or MODULE:TABLE[KEY]",
                    help="after the profile, time the graph-replayed step with a module's boolean switch off and "
                         "on, in turn, --ab-rounds times each, e.g. kimi_linear.layers.kda:FUSED_DECODE_STEP; "
                         "TABLE[*] switches every entry of a 0 / 1 table together")
    ap.add_argument("--ab-values", default=None, metavar="A,B",
                    help="with --ab MODULE:TABLE[KEY]: alternate the entry between these two integers instead of 0 / 1 "
                         "(a launch table's tile, e.g. --ab 'kimi_linear.ops.latent_absorb_triton:TILES[BR]' --ab-values 64,32)")
    ap.add_argument("--ab-rounds", type=int, default=3)
    ap.add_argument("--update", action="append", default=[], metavar="MODULE:ATTR=JSON",
                    help="set a module attribute before the run (a dict is updated), e.g. "
                         "'kimi_linear.ops.moe_decode:TILES={\"down_one\": {\"BLOCK_R\": 2, \"BLOCK_I\": 1024, "
                         "\"num_warps\": 1}}'; repeatable")
    ap.add_argument("--latent-tiles", default="{}",
                    help='latent_attention_triton.TILES overrides, e.g. \'{"keys_major_from": 0}\'')
    args = ap.parse_args()
    import json

    from kimi_linear.ops import latent_attention_triton

    latent_attention_triton.TILES.update(json.loads(args.latent_tiles))
    for spec in args.update:
        import importlib

        target, value = spec.split("=", 1)
        mod_name, attr = target.split(":")
        mod, value = importlib.import_module(mod_name), json.loads(value)
        if isinstance(getattr(mod, attr), dict) and isinstance(value, dict):
            getattr(mod, attr).update(value)
        else:
            setattr(mod, attr, value)
        print(f"{target} = {getattr(mod, attr)}")
    from kimi_linear.ops import pdl

    pdl.ENABLED = not args.no_pdl
    if args.no_fold_norms:
        from kimi_linear.model import modeling

        modeling.FOLD_DECODE_NORMS = False
    if args.route_split_d is not None:
        from kimi_linear.ops import moe_route_kernel

        moe_route_kernel.SPLIT_D = args.route_split_d
    dev = torch.device(args.device)
    model = build_model(bench_config(args.layout, layers=args.layers, vocab=args.vocab), dev, torch.bfloat16)
    steps = 5
    cache = cache_for_config(model.config, batch_size=args.batch, max_len=args.context + 2 * steps + 4, device=dev,
                             dtype=_model_dtype(model))
    _fill_random_(cache, args.context)
    tok = torch.randint(0, model.config.vocab_size, (args.batch, 1), device=dev)
    key_len = cache.max_len
    step = functools.partial(forward_last_logits, model, tok, cache, key_len=key_len)
    times = kernel_times(step, dev, reps=steps)
    tot = {name: ms * 1e3 for name, (ms, _) in times.items()}  # us per step
    cnt = {name: n for name, (_, n) in times.items()}
    total = sum(tot.values())
    from kimi_linear.model import modeling

    print(f"{args.layout} B={args.batch} context={args.context} fold_norms={int(modeling.FOLD_DECODE_NORMS)} "
          f"pdl={int(pdl.use_pdl(dev))}: "
          f"kernels per step {sum(cnt.values())}, "
          f"GPU time per step {total / 1000:.3f} ms")
    for name, us in sorted(tot.items(), key=lambda x: -x[1])[: args.top]:
        print(f"  {us:9.1f} us  x{cnt[name]:4d}  {name[:100]}")
    if args.sequence and dev.type == "cuda":
        print(f"first {args.sequence} kernels of one step, in order:")
        for name, us in kernel_sequence(step)[: args.sequence]:
            print(f"  {us:7.1f} us  {name[:90]}")
    del step, cache
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    rec = time_decode(model, args.batch, args.context, dev)
    print(f"graph-replayed step: {rec['step_ms']:.3f} ms (cuda_graph={rec['cuda_graph']})")
    if args.compare_pdl:
        from kimi_linear.ops import moe_decode

        modes = {"pdl off": (False, False), "pdl on": (True, False), "pdl on + shared experts early": (True, True)}
        runs: dict[str, list[float]] = {m: [] for m in modes}
        for _ in range(args.compare_pdl):
            for mode, (pdl.ENABLED, moe_decode.EARLY_SHARED_EXPERTS) in modes.items():
                runs[mode].append(time_decode(model, args.batch, args.context, dev, steps=32)["step_ms"])
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
        for mode, ms in runs.items():
            print(f"graph-replayed step, {mode}: median {sorted(ms)[len(ms) // 2]:.3f} ms "
                  f"(runs: {', '.join(f'{t:.3f}' for t in ms)})")
        pdl.ENABLED, moe_decode.EARLY_SHARED_EXPERTS = not args.no_pdl, True
    if args.ab:
        import importlib

        mod_name, flag = args.ab.split(":")
        mod = importlib.import_module(mod_name)
        # MODULE:FLAG (a boolean) or MODULE:TABLE[KEY] (a launch table's entry, switched 0 / 1)
        table, key = (flag[:-1].split("[", 1) if flag.endswith("]") else (None, None))
        keys = (list(getattr(mod, table)) if key == "*" else [key]) if table else []
        saved = {k: getattr(mod, table)[k] for k in keys}
        get = (lambda: getattr(mod, table)[keys[0]]) if table else (lambda: getattr(mod, flag))

        def put(v):
            """None: back as before; else the entry (entries) or switch to v (0 / 1 entries as ints)."""
            if not table:
                setattr(mod, flag, default if v is None else v)
            for k in keys:
                getattr(mod, table)[k] = saved[k] if v is None else (int(v) if isinstance(v, bool) else v)

        default = get()
        if args.ab_values is not None:  # two integer settings of one table entry
            if not table or key == "*":
                raise SystemExit("--ab-values needs --ab MODULE:TABLE[KEY] with one key")
            settings = tuple(int(v) for v in args.ab_values.split(","))
            if len(settings) != 2:
                raise SystemExit(f"--ab-values takes two integers A,B, got {args.ab_values!r}")
        else:
            settings = (False, True)
            if table and not all(v in (0, 1) for v in saved.values()):
                raise SystemExit(f"--ab needs 0 / 1 table entries, {args.ab} has {saved!r}")
            if not isinstance(default, bool) and not (table and default in (0, 1)):
                raise SystemExit(f"--ab needs a boolean switch or a 0 / 1 table entry, {args.ab} is {default!r}")
        ab: dict = {v: [] for v in settings}
        for _ in range(args.ab_rounds):
            for value in settings:
                put(value)
                ab[value].append(time_decode(model, args.batch, args.context, dev, steps=32)["step_ms"])
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
        put(None)  # back as they were
        for value, ms in ab.items():
            print(f"graph-replayed step, {flag}={value}: median {sorted(ms)[len(ms) // 2]:.3f} ms "
                  f"(runs: {', '.join(f'{t:.3f}' for t in ms)})")


if __name__ == "__main__":
    main()
