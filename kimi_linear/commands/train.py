"""``kimi-linear train``: the config-driven trainer (see docs/training.md).

Same command on CPU, one GPU, or N GPUs: ``torchrun --nproc-per-node N -m kimi_linear.cli train ...``.
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train", help="train a Kimi Linear model (presets or config.json; text/JSONL data or the stdlib corpus)",
        description="Every TrainConfig field is a flag; --config FILE (JSON/TOML) sets several at once; "
                    "flags given on the command line override the file.",
    )
    from kimi_linear.train.config import add_config_arguments

    add_config_arguments(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from kimi_linear.train.config import config_from_args
    from kimi_linear.train.trainer import train

    try:
        cfg = config_from_args(args)
        cfg.check_paths()
    except (ValueError, FileNotFoundError) as exc:
        raise SystemExit(f"kimi-linear train: {exc}") from None
    result = train(cfg)
    last = result.val_losses.get(result.steps)
    print(f"done: {result.steps} steps" + (f", validation loss {last:.4f}" if last is not None else "")
          + f"; model: {result.final_dir}")
    return 0
