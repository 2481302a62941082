"""``kimi-linear bench decode``: whole-model decode, 3:1 hybrid vs all-MLA (kimi_linear/bench/model_decode.py).

  kimi-linear bench decode [--contexts 4096,...,1048576] [--budget-gib 48] [--max-batch 128] [--with-transformers 4096]
                           [--prefill 4096,16384,32768,65536] [--out benchmarks/results/decode]
  kimi-linear bench decode --cache-only      (cache bytes table, no GPU needed)

Writes ``decode_<tag>.jsonl``, ``.md`` and ``.png`` under ``--out``; prints the markdown and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys


def _ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def register_decode(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser("decode", help="whole-model decode: hybrid vs all-MLA (paper Fig. 1b/7), cache, TPOT, prefill")
    d.add_argument("--contexts", default="4096,16384,65536,131072,262144,524288,1048576")
    d.add_argument("--budget-gib", type=float, default=48.0, help="memory budget for the caches of one batch")
    d.add_argument("--max-batch", type=int, default=128)
    d.add_argument("--prefill", default="4096,16384,32768,65536", help="prefill lengths ('' = none)")
    d.add_argument("--experts", type=int, default=16)
    d.add_argument("--top-k", type=int, default=8)
    d.add_argument("--layers", type=int, default=27)
    d.add_argument("--vocab", type=int, default=163840)
    d.add_argument("--layouts", default="hybrid,mla")
    d.add_argument("--out", default="benchmarks/results/decode")
    d.add_argument("--tag", default=None)
    d.add_argument("--cache-only", action="store_true", help="only the cache-size table (no GPU)")
    d.add_argument("--with-transformers", default="4096", metavar="CONTEXTS",
                   help="also time transformers' own generate at these contexts in the same run ('' = none)")
    d.add_argument("--transformers", type=int, default=0, metavar="CONTEXT",
                   help="only time transformers' own generate at this context (hybrid layout, same geometry)")
    d.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from kimi_linear.bench import model_decode as md
    from kimi_linear.bench.common import environment, run_tag

    if args.transformers:
        rec = md.time_transformers(args.transformers, torch.device("cuda"), experts=args.experts, top_k=args.top_k)
        print(json.dumps(rec))
        if args.out:
            from pathlib import Path

            Path(args.out).mkdir(parents=True, exist_ok=True)
            with open(Path(args.out) / f"decode_transformers_{args.tag or 'run'}.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
        return 0
    contexts = _ints(args.contexts)
    layouts = tuple(t for t in args.layouts.split(",") if t)
    cuda = torch.cuda.is_available() and not args.cache_only
    if not cuda and not args.cache_only:
        print("bench decode needs a CUDA GPU (use --cache-only for the cache table)", file=sys.stderr)
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    env = environment(device)
    tag = args.tag or run_tag(env)
    writer = None
    if args.out and cuda:
        from pathlib import Path

        Path(args.out).mkdir(parents=True, exist_ok=True)
        partial_path = Path(args.out) / f"decode_{tag}.partial.jsonl"
        partial_path.write_text("")

        def writer(rec: dict) -> None:  # rows survive a run that is cut short
            with open(partial_path, "a") as f:
                f.write(json.dumps({"bench": "decode", "env": env, **rec}) + "\n")
    prefill = {lay: _ints(args.prefill) for lay in layouts} if cuda else None
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    if cuda:
        records = md.run(contexts=contexts, budget_gib=args.budget_gib, cap=args.max_batch, device=device, env=env,
                         prefill=prefill, log=log, layouts=layouts, experts=args.experts, top_k=args.top_k,
                         layers=args.layers, vocab=args.vocab,
                         on_record=(lambda r: writer(r)) if writer else None,
                         transformers_contexts=tuple(_ints(args.with_transformers)))
    else:
        records = md.cache_records(contexts, layouts, experts=args.experts, top_k=args.top_k, layers=args.layers,
                                   vocab=args.vocab)
    note = (f"Model: hidden 2304, {args.layers} layers, KDA 32x128, MLA 32 heads (latent 512 + 64), vocab {args.vocab}; "
            f"MoE reduced to {args.experts} experts top-{args.top_k} + 1 shared (1024 wide), bf16, random weights. "
            f"Decode timings use caches filled with random latents/states of the right size (no prefill); "
            f"largest batch = the most sequences whose caches fit {args.budget_gib} GiB (cap {args.max_batch}); "
            f"'ms/token at B_max' = step time / batch (1 / throughput).")
    text = md.markdown(env, records, note)
    print(text)
    if args.out:
        from pathlib import Path

        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / f"decode_{tag}.jsonl", "w") as f:
            for r in records:
                f.write(json.dumps({"bench": "decode", "env": env, **r}) + "\n")
        (out / f"decode_{tag}.md").write_text(text)
        partial = out / f"decode_{tag}.partial.jsonl"
        if partial.exists():
            partial.unlink()
        try:
            md.plot(records, out / f"decode_{tag}.png", title=f"Kimi Linear decode, {env.get('gpu') or device}")
        except Exception as exc:  # noqa: BLE001 - a missing matplotlib must not lose the results
            print(f"plot skipped: {exc}", file=sys.stderr)
    print(json.dumps({"bench": "decode", "env": env, "results": records}))
    return 0
