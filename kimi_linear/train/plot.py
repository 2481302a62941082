"""``kimi-linear plot RUN_DIR``: loss (and accuracy) curves of a run's ``metrics.jsonl`` to PNG."""

from __future__ import annotations

import json
import os
from pathlib import Path

from kimi_linear.train.checkpointing import read_metrics


def _smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot_run(run_dir: str | os.PathLike, out: str | os.PathLike | None = None, *, title: str | None = None) -> Path:
    """Draw train loss (raw + smoothed), validation loss, the unigram baseline when the run recorded one
    (``run_info.json``), and accuracy when present. Returns the PNG path (default ``RUN_DIR/loss.png``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    recs = read_metrics(run_dir / "metrics.jsonl")
    train = [(r["step"], r["loss"]) for r in recs if r.get("kind") == "train" and "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in recs if r.get("kind") == "eval" and r.get("val_loss") is not None]
    acc = [(r["step"], r["accuracy"]) for r in recs if "accuracy" in r]
    if not train and not val and not acc:
        raise ValueError(f"{run_dir}/metrics.jsonl holds no loss or accuracy records to plot")
    info_path = run_dir / "run_info.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    if train:
        s, v = zip(*train)
        ax.plot(s, v, color="tab:blue", alpha=0.25, lw=0.8)
        ax.plot(s, _smooth(list(v), max(1, len(v) // 30)), color="tab:blue", lw=1.6, label="train loss")
    if val:
        s, v = zip(*val)
        ax.plot(s, v, "o-", color="tab:orange", lw=1.6, ms=3.5, label="validation loss")
    if "unigram_entropy" in info:
        ax.axhline(info["unigram_entropy"], color="gray", ls="--", lw=1.2,
                   label=f"unigram baseline ({info['unigram_entropy']:.2f})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    if acc:
        ax2 = ax.twinx()
        s, v = zip(*acc)
        ax2.plot(s, v, "s-", color="tab:green", lw=1.4, ms=3, label="accuracy")
        ax2.set_ylabel("accuracy")
        ax2.set_ylim(0, 1.02)
        ax2.legend(loc="center right")
    ax.legend(loc="upper right")
    ax.set_title(title or info.get("title") or run_dir.name)
    fig.tight_layout()
    out = Path(out) if out else run_dir / "loss.png"
    fig.savefig(out)
    plt.close(fig)
    return out
