"""Compare training runs' loss curves step by step against a reference run (the multi-GPU check).

    python3 benchmarks/compare_loss_curves.py RUNS/one RUNS/ddp RUNS/fsdp \
        --labels "1 GPU" "2 GPU DDP" "2 GPU FSDP2" [--noise RUNS/accum] [--png curves.png] [--json cmp.json]

Each argument is a ``kimi-linear train`` run directory (its ``metrics.jsonl``). The first is the
reference. For every other run it prints, over the steps both logged: the max and mean absolute
train-loss difference, the same over the last quarter of the steps, the largest relative
gradient-norm difference, the final validation losses, and tokens/s (global tokens per second of
wall time, from ``tokens`` and ``elapsed_s``, after the first ``--skip`` steps so that kernel
compilation and start-up are left out).

``--noise RUN``: a run that is mathematically the same as the reference but sums in another order
(for the multi-GPU check: 1 GPU with the global batch split into as many micro-batches as there
are GPUs, i.e. the same per-forward shapes as the multi-GPU runs). Its distance from the
reference is the floating-point noise floor; each run's max difference is also printed as a
multiple of it. No threshold is built in: ``--max-ratio R`` (optional) makes the exit status 1
when a run's max difference exceeds R times the noise run's (or when steps do not line up or a
loss is not finite).

``--png``: one figure, the loss curves (left) and the absolute differences from the reference
(right, log scale); skipped with a note when matplotlib is missing (the table is printed anyway).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


def read_metrics(run_dir: str) -> dict:
    """``{"train": {step: record}, "eval": {step: val_loss}}`` from a run's metrics.jsonl."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics.jsonl in {run_dir} (did the run start?)")
    train, evals = {}, {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        if rec.get("kind") == "train":
            train[int(rec["step"])] = rec
        elif rec.get("kind") == "eval" and rec.get("val_loss") is not None:
            evals[int(rec["step"])] = float(rec["val_loss"])
    if not train:
        raise ValueError(f"{path} holds no train records")
    return {"train": train, "eval": evals}


def tokens_per_s(train: dict[int, dict], skip: int) -> float | None:
    """Global tokens per wall second between step ``skip`` (or the first logged step) and the last."""
    steps = sorted(train)
    first = next((s for s in steps if s >= skip), steps[0])
    last = steps[-1]
    if last == first:
        return None
    dt = train[last]["elapsed_s"] - train[first]["elapsed_s"]
    return (train[last]["tokens"] - train[first]["tokens"]) / dt if dt > 0 else None


def compare(ref: dict, run: dict) -> dict:
    """Differences of ``run`` from ``ref`` over their common logged steps."""
    common = sorted(set(ref["train"]) & set(run["train"]))
    if not common:
        raise ValueError("the runs share no logged step")
    d = [abs(run["train"][s]["loss"] - ref["train"][s]["loss"]) for s in common]
    tail = common[-max(1, len(common) // 4):]
    dt = [abs(run["train"][s]["loss"] - ref["train"][s]["loss"]) for s in tail]
    g = [abs(run["train"][s]["grad_norm"] - ref["train"][s]["grad_norm"]) / max(abs(ref["train"][s]["grad_norm"]), 1e-12)
         for s in common if "grad_norm" in run["train"][s] and "grad_norm" in ref["train"][s]]
    last = max(common)
    return {
        "steps": len(common), "ref_steps": len(ref["train"]), "run_steps": len(run["train"]),
        "max_abs": max(d), "mean_abs": sum(d) / len(d), "argmax_step": common[d.index(max(d))],
        "tail_max_abs": max(dt), "tail_mean_abs": sum(dt) / len(dt),
        "grad_norm_max_rel": max(g) if g else None,
        "final_loss": run["train"][last]["loss"], "ref_final_loss": ref["train"][last]["loss"],
        "finite": all(math.isfinite(r["loss"]) for r in run["train"].values()),
        "diff_curve": list(zip(common, d)),
    }


def _fmt(x: float | None, spec: str) -> str:
    """``format(x, spec)``, or "-" for a missing value."""
    return "-" if x is None else format(x, spec)


def plot(path: str, labels: list[str], runs: list[dict], diffs: list[dict | None]) -> bool:
    """Loss curves and |differences|; False (with a note) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: no plot ({path}); the table above has the numbers")
        return False
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4), dpi=120)
    styles = ["-", "--", ":", "-."]
    for i, (label, run) in enumerate(zip(labels, runs)):
        steps = sorted(run["train"])
        a.plot(steps, [run["train"][s]["loss"] for s in steps], styles[i % 4], color=f"C{i}", lw=1.2, label=label)
        if diffs[i] is not None:
            s, d = zip(*diffs[i]["diff_curve"])
            b.semilogy(s, [max(x, 1e-9) for x in d], styles[i % 4], color=f"C{i}", lw=1.0,
                       label=f"{label} vs {labels[0]}")
    a.set_xlabel("step")
    a.set_ylabel("train loss (nats/token)")
    a.set_title("loss curves, same global batch")
    a.grid(alpha=0.3)
    a.legend(fontsize=8)
    b.set_xlabel("step")
    b.set_ylabel(f"|loss - loss({labels[0]})|")
    b.set_title("difference from the reference (floored at 1e-9)")
    b.grid(alpha=0.3, which="both")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="run directories; the first is the reference")
    p.add_argument("--labels", nargs="+", default=None)
    p.add_argument("--noise", default=None, help="a run equal to the reference up to summation order")
    p.add_argument("--noise-label", default="noise floor")
    p.add_argument("--skip", type=int, default=10, help="steps left out of tokens/s (compile, start-up)")
    p.add_argument("--max-ratio", type=float, default=None, help="fail when max diff > R x the noise run's")
    p.add_argument("--png", default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    labels = list(args.labels or [Path(r).name for r in args.runs])
    if len(labels) != len(args.runs):
        p.error(f"{len(args.runs)} runs but {len(labels)} labels")
    dirs = list(args.runs)
    if args.noise:
        dirs.append(args.noise)
        labels.append(args.noise_label)
    runs = [read_metrics(d) for d in dirs]
    diffs: list[dict | None] = [None] + [compare(runs[0], r) for r in runs[1:]]
    noise = diffs[-1] if args.noise else None

    ok = True
    head = (f"{'run':<16} {'steps':>5} {'max|dL|':>10} {'mean|dL|':>10} {'tail max':>10} {'tail mean':>10} "
            f"{'x noise':>8} {'max rel dG':>10} {'final L':>8} {'val L':>8} {'tok/s':>10}")
    print(head)
    print("-" * len(head))
    out = []
    for label, run, d in zip(labels, runs, diffs):
        tps = tokens_per_s(run["train"], args.skip)
        val = run["eval"][max(run["eval"])] if run["eval"] else None
        row = {"label": label, "tokens_per_s": tps, "final_val_loss": val, "steps_logged": len(run["train"])}
        if d is None:
            last = max(run["train"])
            print(f"{label:<16} {len(run['train']):>5} {'(reference)':>10} {'':>10} {'':>10} {'':>10} {'':>8} {'':>10} "
                  f"{run['train'][last]['loss']:>8.4f} {_fmt(val, '.4f'):>8} {_fmt(tps, ',.0f'):>10}")
        else:
            ratio = d["max_abs"] / noise["max_abs"] if noise and noise["max_abs"] > 0 and d is not noise else None
            row.update({k: v for k, v in d.items() if k != "diff_curve"}, noise_ratio=ratio)
            g = d["grad_norm_max_rel"]
            print(f"{label:<16} {d['steps']:>5} {d['max_abs']:>10.2e} {d['mean_abs']:>10.2e} {d['tail_max_abs']:>10.2e} "
                  f"{d['tail_mean_abs']:>10.2e} {_fmt(ratio, '.2f'):>8} {_fmt(g, '.2e'):>10} {d['final_loss']:>8.4f} "
                  f"{_fmt(val, '.4f'):>8} {_fmt(tps, ',.0f'):>10}")
            if not d["finite"] or d["steps"] != d["ref_steps"] or d["steps"] != d["run_steps"]:
                ok = False
                print(f"  !! {label}: steps do not line up with the reference or a loss is not finite")
            if args.max_ratio is not None and ratio is not None and ratio > args.max_ratio:
                ok = False
                print(f"  !! {label}: max difference {ratio:.2f}x the noise run's (limit {args.max_ratio}x)")
        out.append(row)
    print("dL: train-loss difference from the reference at the same step; tail: the last quarter of the steps; "
          "x noise: max|dL| over the noise run's max|dL|; dG: grad-norm difference relative to the reference's; "
          f"tok/s: global tokens per second after step {args.skip}.")
    if args.png:
        if plot(args.png, labels, runs, diffs):
            print(f"plot: {args.png}")
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": out, "ok": ok}, indent=1) + "\n", encoding="utf-8")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
