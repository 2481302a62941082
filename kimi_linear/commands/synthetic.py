"""``kimi-linear synthetic``: the paper's Figure-4 recall tasks (Palindrome, MQAR, Stack).

    kimi-linear synthetic show mqar --length 32          one example, answers starred
    kimi-linear synthetic run --out DIR [--tasks ...] [--models kda gdn decay] [--lengths ...] [--lrs ...]
    kimi-linear synthetic report DIR                     results.md + accuracy_L*.png from results.jsonl
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("synthetic", help="synthetic recall tasks (Palindrome, MQAR, Stack): KDA vs GDN vs decay-only")
    sub = p.add_subparsers(dest="synthetic_command", metavar="ACTION")
    s = sub.add_parser("show", help="print one example sequence (labelled positions starred)")
    s.add_argument("task", choices=["palindrome", "mqar", "stack"])
    s.add_argument("--length", type=int, default=32)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(handler=_show)
    r = sub.add_parser("run", help="train the protocol grid and write results.jsonl, results.md and plots")
    r.add_argument("--out", required=True)
    r.add_argument("--tasks", nargs="+", default=["palindrome", "mqar", "stack"])
    r.add_argument("--models", nargs="+", default=["kda", "gdn", "decay"])
    r.add_argument("--lengths", nargs="+", type=int, default=[256, 512, 1024, 2048])
    r.add_argument("--lrs", nargs="+", type=float, default=[5e-5, 1e-4, 5e-4, 1e-3])
    r.add_argument("--steps", type=int, default=20000, help="step budget per run (the paper: up to 20K)")
    r.add_argument("--max-seconds", type=float, default=None, help="wall-clock cap per run")
    r.add_argument("--batch-size", type=int, default=32)
    r.add_argument("--eval-every", type=int, default=100)
    r.add_argument("--eval-size", type=int, default=256)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--device", default="auto")
    r.add_argument("--backend", default="auto", choices=["auto", "triton", "reference"])
    r.add_argument("--warmup", action="store_true",
                   help="first run 2 unrecorded steps per model (kernel compilation stays out of timed runs)")
    r.set_defaults(handler=_run)
    t = sub.add_parser("report", help="results.md + accuracy plots from DIR/results.jsonl")
    t.add_argument("run_dir")
    t.set_defaults(handler=_report)
    p.set_defaults(handler=lambda args: p.print_help() or 0)


def _show(args: argparse.Namespace) -> int:
    from kimi_linear.train.synthetic import describe

    print(describe(args.task, args.length, args.seed))
    return 0


def _run(args: argparse.Namespace) -> int:
    from kimi_linear.train.synthetic_runner import SyntheticRun, report, run_grid

    for task in args.tasks:  # fail on bad settings before any training
        for model in args.models:
            for length in args.lengths:
                for lr in args.lrs:
                    try:
                        SyntheticRun(task=task, variant=model, length=length, lr=lr, steps=args.steps,
                                     batch_size=args.batch_size, eval_every=args.eval_every).validate()
                    except ValueError as exc:
                        raise SystemExit(f"kimi-linear synthetic run: {exc}") from None
    if args.warmup:
        from kimi_linear.train.synthetic_runner import run_one

        for model in args.models:
            run_one(SyntheticRun(task=args.tasks[0], variant=model, length=min(args.lengths), lr=args.lrs[0], steps=2,
                                 batch_size=args.batch_size, eval_every=2, eval_size=args.batch_size,
                                 device=args.device, backend=args.backend), log=lambda *_: None)
    records = run_grid(args.out, tasks=args.tasks, variants=args.models, lengths=args.lengths, lrs=args.lrs,
                       steps=args.steps, max_seconds=args.max_seconds, batch_size=args.batch_size,
                       eval_every=args.eval_every, eval_size=args.eval_size, seed=args.seed, device=args.device,
                       backend=args.backend)
    table, plots = report(records, args.out)
    print(table.read_text())
    print("plots:", ", ".join(str(p) for p in plots))
    return 0


def _report(args: argparse.Namespace) -> int:
    from kimi_linear.train.synthetic_runner import load_results, report

    table, plots = report(load_results(args.run_dir), args.run_dir)
    print(table.read_text())
    print("plots:", ", ".join(str(p) for p in plots))
    return 0
