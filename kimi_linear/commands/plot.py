"""``kimi-linear plot RUN_DIR``: loss/accuracy curves of a training run to PNG."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("plot", help="plot a run's metrics.jsonl (loss, validation loss, accuracy) to PNG")
    p.add_argument("run_dir", help="a run directory holding metrics.jsonl")
    p.add_argument("--out", default=None, help="PNG path (default RUN_DIR/loss.png)")
    p.add_argument("--title", default=None)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from kimi_linear.train.plot import plot_run

    try:
        path = plot_run(args.run_dir, args.out, title=args.title)
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"kimi-linear plot: {exc}") from None
    print(path)
    return 0
