"""``kimi-linear quickstart``: train a small Kimi Linear on the embedded corpus in a few minutes."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "quickstart", help="train a small 3:1 KDA/MLA + MoE model on the stdlib corpus, evaluate, save, sample",
        description="Trains for --minutes (default 5) on this machine, then evaluates the validation loss "
                    "against the unigram baseline, saves a transformers-loadable checkpoint, plots the loss "
                    "and generates a sample.",
    )
    p.add_argument("--minutes", type=float, default=5.0, help="training time budget (default 5)")
    p.add_argument("--steps", type=int, default=None, help="train a fixed number of steps instead")
    p.add_argument("--out", default="runs/quickstart", help="output directory (replaced if it exists)")
    p.add_argument("--tiny", action="store_true", help="a very small model and batch (CI smoke test)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt", default=None, help="prompt for the sample continuation")
    p.add_argument("--max-new-tokens", type=int, default=160)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--data", nargs="+", default=["stdlib"],
                   help="text/JSONL files or folders instead of the embedded stdlib corpus (needs >= 2 files)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from kimi_linear.train.quickstart import DEFAULT_PROMPT, QuickstartOptions, run_quickstart

    if args.minutes <= 0 or (args.steps is not None and args.steps < 1):
        raise SystemExit("kimi-linear quickstart: --minutes must be > 0 and --steps >= 1")
    opts = QuickstartOptions(minutes=args.minutes, steps=args.steps, out=args.out, tiny=args.tiny, seed=args.seed,
                             device=args.device, prompt=args.prompt or DEFAULT_PROMPT,
                             max_new_tokens=args.max_new_tokens, progress=not args.no_progress, data=tuple(args.data))
    try:  # a missing or too small corpus fails here, before any work
        from kimi_linear.train.corpus import list_files, split_files

        split_files(list_files(list(opts.data)), 0.02)
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"kimi-linear quickstart: {exc}") from None
    run_quickstart(opts)
    return 0
