"""The Figure-4 protocol: KDA vs Gated DeltaNet vs decay-only on Palindrome / MQAR / Stack.

Models (built from :class:`KimiLinearConfig` with ``kda_variant``, otherwise identical): 2 layers,
both linear attention, 2 heads of head dim 128 (hidden 256), dense SwiGLU MLP (width 512), short
convs, output gate -- the Kimi Linear KDA layer with its operator swapped:

- ``kda``:   per-channel decay + delta rule (the paper's KDA);
- ``gdn``:   one decay per head + delta rule (Gated DeltaNet);
- ``decay``: per-channel decay, no delta rule (GLA / Mamba2-like).

Protocol: lengths 256 / 512 / 1024 / 2048, learning rates {5e-5, 1e-4, 5e-4, 1e-3}, AdamW (no
decay on gates / norms), linear warmup then cosine to 10%, gradient clipping 1.0, bf16 autocast on
GPU, accuracy on a fixed evaluation set every ``eval_every`` steps; a model's score for a task and
length is its best accuracy over the learning rates. Each run appends one JSON line to
``results.jsonl``; :func:`report` turns the file into a markdown table and accuracy-vs-steps plots.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from kimi_linear.train.optim import build_optimizer, lr_at
from kimi_linear.train.synthetic import IGNORE, TASKS, VOCAB_SIZE, eval_set, make_batch

VARIANTS = ("kda", "gdn", "decay")
LENGTHS = (256, 512, 1024, 2048)
LRS = (5e-5, 1e-4, 5e-4, 1e-3)
MODEL_NAMES = {"kda": "KDA", "gdn": "Gated DeltaNet", "decay": "decay-only"}


@dataclass
class SyntheticRun:
    task: str
    variant: str
    length: int
    lr: float
    steps: int = 2000
    batch_size: int = 32
    eval_every: int = 100
    eval_size: int = 256
    seed: int = 0
    max_seconds: float | None = None  # wall-clock cap for this run (the step reached is recorded)
    device: str = "auto"
    backend: str = "auto"
    hidden_size: int = 256
    num_heads: int = 2
    head_dim: int = 128
    num_layers: int = 2
    mlp_width: int = 512
    extra: dict = field(default_factory=dict)

    def validate(self) -> SyntheticRun:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {sorted(TASKS)}, got {self.task!r}")
        if self.variant not in VARIANTS:
            raise ValueError(f"model must be one of {VARIANTS}, got {self.variant!r}")
        if self.length < 8 or self.steps < 1 or self.batch_size < 1 or self.eval_every < 1 or self.lr <= 0:
            raise ValueError(f"bad run settings: length={self.length} (>= 8), steps={self.steps}, batch={self.batch_size}, "
                             f"eval_every={self.eval_every} (>= 1), lr={self.lr} (> 0)")
        return self


def model_config(run: SyntheticRun):
    """The KimiLinearConfig of a protocol model (all layers linear attention of ``run.variant``)."""
    from kimi_linear.model.config import KimiLinearConfig

    L = run.num_layers
    return KimiLinearConfig.preset(
        "tiny-kda",
        vocab_size=((VOCAB_SIZE + 63) // 64) * 64, hidden_size=run.hidden_size, intermediate_size=run.mlp_width,
        num_hidden_layers=L, num_experts=None,
        linear_attn_config={"kda_layers": list(range(1, L + 1)), "full_attn_layers": [], "num_heads": run.num_heads,
                            "head_dim": run.head_dim, "short_conv_kernel_size": 4},
        kda_variant=run.variant, bos_token_id=None, eos_token_id=None, pad_token_id=0,
    )


@torch.no_grad()
def accuracy(model, x: torch.Tensor, y: torch.Tensor, device: torch.device, batch: int, autocast) -> float:
    """Share of labelled positions whose argmax prediction (from the previous position) is right."""
    model.eval()
    right = total = 0
    for i in range(0, x.shape[0], batch):
        xb, yb = x[i:i + batch].to(device), y[i:i + batch].to(device)
        with autocast():
            logits = model(xb).logits
        pred = logits[:, :-1].argmax(-1)
        tgt = yb[:, 1:]
        mask = tgt != IGNORE
        right += int((pred == tgt)[mask].sum())
        total += int(mask.sum())
    model.train()
    return right / max(total, 1)


def train_step(model, opt, x: torch.Tensor, y: torch.Tensor, autocast) -> torch.Tensor:
    """One optimiser step on a batch (clip at 1.0); returns the loss (the budget probe times this)."""
    with autocast():
        loss = model(x, labels=y).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def run_one(run: SyntheticRun, log=print) -> dict:
    """Train one model on one task/length/lr; return the result record (also the JSONL line)."""
    from kimi_linear.model.modeling import KimiLinearForCausalLM

    run.validate()
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if run.device == "auto" else run.device)
    torch.manual_seed(run.seed)
    model = KimiLinearForCausalLM(model_config(run), backend=run.backend).to(device).float()
    opt = build_optimizer(model, lr=run.lr, weight_decay=0.0, betas=(0.9, 0.95), eps=1e-8)
    if device.type == "cuda":
        def autocast():
            return torch.autocast("cuda", dtype=torch.bfloat16)
    else:
        import contextlib

        autocast = contextlib.nullcontext
    ex, ey = eval_set(run.task, run.length, run.eval_size)
    warmup = max(1, min(100, run.steps // 10))
    curve: list[tuple[int, float]] = []
    t0 = time.perf_counter()
    step = 0
    stopped = "steps"
    losses = []
    while step < run.steps:
        if run.max_seconds is not None and time.perf_counter() - t0 > run.max_seconds:
            stopped = "time"
            break
        x, y = make_batch(run.task, run.batch_size, run.length, seed=run.seed, step=step)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        lr = lr_at(step, total=run.steps, lr=run.lr, warmup=warmup, schedule="cosine", min_lr_ratio=0.1)
        for g in opt.param_groups:
            g["lr"] = lr
        loss = train_step(model, opt, x, y, autocast)
        step += 1
        if step % run.eval_every == 0 or step == run.steps:
            losses.append((step, float(loss.detach())))
            acc = accuracy(model, ex, ey, device, max(1, run.batch_size), autocast)
            curve.append((step, acc))
            log(f"  {run.task:10s} {run.variant:5s} L={run.length:<5d} lr={run.lr:g} step {step:6d} "
                f"loss {float(loss.detach()):.4f} acc {acc:.4f} ({time.perf_counter() - t0:.0f}s)")
            if not math.isfinite(float(loss.detach())):
                stopped = "nan"
                break
    if not curve or curve[-1][0] != step:
        if step > 0:
            curve.append((step, accuracy(model, ex, ey, device, max(1, run.batch_size), autocast)))
    seconds = time.perf_counter() - t0
    rec = {
        "task": run.task, "model": run.variant, "length": run.length, "lr": run.lr, "steps_planned": run.steps,
        "steps_done": step, "stopped_by": stopped, "batch_size": run.batch_size, "eval_size": run.eval_size,
        "curve": curve, "losses": losses, "final_acc": curve[-1][1] if curve else 0.0,
        "best_acc": max((a for _, a in curve), default=0.0), "seconds": round(seconds, 2),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "config": asdict(run),
    }
    return rec


def run_grid(out_dir: str | os.PathLike, *, tasks, variants, lengths, lrs, log=print, **run_kwargs) -> list[dict]:
    """Every (task, length, model, lr) combination; appends each result to ``out_dir/results.jsonl``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for task in tasks:
        for length in lengths:
            for variant in variants:
                for lr in lrs:
                    rec = run_one(SyntheticRun(task=task, variant=variant, length=length, lr=lr, **run_kwargs), log=log)
                    records.append(rec)
                    with open(out / "results.jsonl", "a", encoding="utf-8") as f:
                        f.write(json.dumps(rec) + "\n")
    return records


def load_results(path: str | os.PathLike) -> list[dict]:
    p = Path(path)
    if p.is_dir():
        p = p / "results.jsonl"
    if not p.is_file():
        raise FileNotFoundError(f"no synthetic results at {p}")
    return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]


def best_runs(records: list[dict]) -> dict[tuple[str, int, str], dict]:
    """(task, length, model) -> the record with the best accuracy over learning rates."""
    best: dict[tuple[str, int, str], dict] = {}
    for r in records:
        key = (r["task"], r["length"], r["model"])
        if key not in best or r["best_acc"] > best[key]["best_acc"]:
            best[key] = r
    return best


def report(records: list[dict], out_dir: str | os.PathLike) -> tuple[Path, list[Path]]:
    """Markdown table (best accuracy per model, with its lr and steps) + one accuracy-vs-steps PNG per
    (task, length) with the best-lr curve of each model. Returns (table path, plot paths)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    best = best_runs(records)
    tasks = sorted({k[0] for k in best})
    lengths = sorted({k[1] for k in best})
    variants = [v for v in VARIANTS if any(k[2] == v for k in best)]
    lines = ["| task | length | " + " | ".join(MODEL_NAMES[v] for v in variants) + " |",
             "|---|---|" + "---|" * len(variants)]
    for task in tasks:
        for length in lengths:
            cells = []
            for v in variants:
                r = best.get((task, length, v))
                if r is None:
                    cells.append("-")
                    continue
                hit = next((st for st, a in r["curve"] if a >= 0.9), None)
                cells.append(f"{100 * r['best_acc']:.1f}% (lr {r['lr']:g}, {r['steps_done']} steps"
                             + (f", >=90% at step {hit}" if hit is not None else "") + ")")
            if any(c != "-" for c in cells):
                lines.append(f"| {task} | {length} | " + " | ".join(cells) + " |")
    any_rec = records[0]
    lines += ["", f"Best accuracy over the learning rates tried ({sorted({r['lr'] for r in records})}); "
              f"batch {any_rec['batch_size']}, eval set {any_rec['eval_size']} sequences; device {any_rec['device']}, "
              f"torch {any_rec['torch']}."]
    table = out / "results.md"
    table.write_text("\n".join(lines) + "\n")
    plots = []
    colors = {"kda": "tab:red", "gdn": "tab:blue", "decay": "tab:gray"}
    for length in lengths:
        present = [t for t in tasks if any((t, length, v) in best for v in variants)]
        if not present:
            continue
        fig, axes = plt.subplots(1, len(present), figsize=(4.2 * len(present), 3.4), dpi=120, squeeze=False)
        for ax, task in zip(axes[0], present):
            for v in variants:
                r = best.get((task, length, v))
                if r is None or not r["curve"]:
                    continue
                s, a = zip(*r["curve"])
                ax.plot(s, a, "-o", ms=2.5, color=colors[v], label=f"{MODEL_NAMES[v]} (lr {r['lr']:g})")
            ax.set_title(f"{task}, length {length}")
            ax.set_xlabel("step")
            ax.set_ylabel("accuracy")
            ax.set_ylim(0, 1.02)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / f"accuracy_L{length}.png"
        fig.savefig(path)
        plt.close(fig)
        plots.append(path)
    return table, plots
