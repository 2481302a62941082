"""Measure the synthetic-task models' step and evaluation times, then pick one step budget for all.

For ``benchmarks/synthetic_session.sh``: the Figure-4 runs must give every model the SAME number of
steps (``kimi-linear synthetic run --steps N``), and the whole set must fit one device call. This
script times, for every (task, length, model) of the set, the pieces of a run of
:func:`kimi_linear.train.synthetic_runner.run_one` on this machine:

- ``setup``: building the model and optimizer and generating the evaluation set;
- ``step``: one training step (batch generation, forward, backward, clipping, AdamW), the median of
  ``--timed-steps`` steps after ``--warm-steps`` untimed ones (which also compile the kernels);
- ``eval``: one accuracy pass over the evaluation set;

and solves ``sum over runs of [setup + N * step + (N / eval_every + 1) * eval] <= budget`` for the
largest ``N`` (a multiple of ``--round-to``, at most ``--max-steps``). The step is the runner's own
(same model config, optimizer, clipping and autocast; setting the scheduled lr, which costs nothing,
is left out); only the timing loop is here.

Prints the table and the arithmetic; ``--json`` also writes them. The last line is ``STEPS=<N>``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import sys
import time

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_config(task: str, variant: str, length: int, *, batch_size: int, eval_size: int, warm_steps: int,
                timed_steps: int, device: torch.device, backend: str) -> dict:
    """Seconds of setup, one training step and one evaluation for one (task, model, length)."""
    from kimi_linear.model.modeling import KimiLinearForCausalLM
    from kimi_linear.train.optim import build_optimizer
    from kimi_linear.train.synthetic import eval_set, make_batch
    from kimi_linear.train.synthetic_runner import SyntheticRun, accuracy, model_config, train_step

    run = SyntheticRun(task=task, variant=variant, length=length, lr=1e-3, batch_size=batch_size,
                       eval_size=eval_size, backend=backend).validate()
    autocast = ((lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda"
                else contextlib.nullcontext)
    _sync(device)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = KimiLinearForCausalLM(model_config(run), backend=backend).to(device).float()
    opt = build_optimizer(model, lr=run.lr, weight_decay=0.0, betas=(0.9, 0.95), eps=1e-8)
    ex, ey = eval_set(task, length, eval_size)
    _sync(device)
    setup = time.perf_counter() - t0
    times = []
    for step in range(warm_steps + timed_steps):
        t = time.perf_counter()
        x, y = make_batch(task, batch_size, length, seed=0, step=step)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss = train_step(model, opt, x, y, autocast)
        _sync(device)
        if step >= warm_steps:
            times.append(time.perf_counter() - t)
    if not math.isfinite(float(loss.detach())):
        raise FloatingPointError(f"{task} {variant} L={length}: loss {float(loss)} while timing")
    t = time.perf_counter()
    accuracy(model, ex, ey, device, batch_size, autocast)
    _sync(device)
    ev = time.perf_counter() - t
    del model, opt
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"task": task, "model": variant, "length": length, "setup_s": setup,
            "step_s": statistics.median(times), "eval_s": ev}


def plan_steps(rows: list[dict], *, budget_s: float, eval_every: int, n_lrs: int, round_to: int,
               max_steps: int) -> tuple[int, dict]:
    """The largest N (multiple of ``round_to``, <= ``max_steps``) whose predicted total fits ``budget_s``.

    Returns ``(N, arithmetic)``; N is 0 when not even ``round_to`` steps fit.
    """
    fixed = n_lrs * sum(r["setup_s"] + r["eval_s"] for r in rows)  # setup + the final evaluation
    per_step = n_lrs * sum(r["step_s"] + r["eval_s"] / eval_every for r in rows)
    raw = (budget_s - fixed) / per_step if per_step > 0 else float("inf")
    n = int(min(max_steps, max(raw, 0)) // round_to * round_to)
    return n, {"budget_s": budget_s, "fixed_s": fixed, "per_step_s": per_step, "raw_steps": raw,
               "steps": n, "predicted_s": fixed + n * per_step}


def predicted_run_s(r: dict, n: int, eval_every: int) -> float:
    """Predicted wall time of one run of ``n`` steps for a timing row."""
    return r["setup_s"] + n * r["step_s"] + (n // eval_every + 1) * r["eval_s"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", nargs="+", required=True, metavar="TASK:LENGTH",
                   help="(task, length) pairs of the set, e.g. palindrome:1024 mqar:256")
    p.add_argument("--models", nargs="+", default=["kda", "gdn", "decay"])
    p.add_argument("--n-lrs", type=int, default=1, help="learning rates per (task, length, model)")
    p.add_argument("--budget-s", type=float, required=True, help="seconds the whole set may take")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--warm-steps", type=int, default=3)
    p.add_argument("--timed-steps", type=int, default=8)
    p.add_argument("--round-to", type=int, default=50)
    p.add_argument("--max-steps", type=int, default=20000)
    p.add_argument("--device", default="auto")
    p.add_argument("--backend", default="auto", choices=["auto", "triton", "reference"])
    p.add_argument("--json", default=None, help="also write the timings and the arithmetic here")
    args = p.parse_args(argv)

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    pairs = []
    for spec in args.runs:
        task, _, length = spec.partition(":")
        if not length.isdigit():
            p.error(f"--runs takes TASK:LENGTH, got {spec!r}")
        pairs.append((task, int(length)))
    rows = []
    t_all = time.perf_counter()
    for task, length in pairs:
        for variant in args.models:
            r = time_config(task, variant, length, batch_size=args.batch_size, eval_size=args.eval_size,
                            warm_steps=args.warm_steps, timed_steps=args.timed_steps, device=device,
                            backend=args.backend)
            rows.append(r)
            print(f"  {task:10s} L={length:<5d} {variant:5s} setup {r['setup_s']:6.2f} s  step {1e3 * r['step_s']:8.1f} ms "
                  f"({1 / r['step_s']:6.1f} steps/s)  eval {1e3 * r['eval_s']:7.1f} ms", flush=True)
    n, arith = plan_steps(rows, budget_s=args.budget_s, eval_every=args.eval_every, n_lrs=args.n_lrs,
                          round_to=args.round_to, max_steps=args.max_steps)
    arith["timing_s"] = time.perf_counter() - t_all
    arith["longest_run_s"] = max(predicted_run_s(r, n, args.eval_every) for r in rows)
    print(f"budget {args.budget_s:.0f} s = fixed {arith['fixed_s']:.1f} s (setup + final eval, {len(rows)} runs x "
          f"{args.n_lrs} lr) + N x {arith['per_step_s']:.3f} s/step (sum of step + eval/{args.eval_every}) "
          f"-> N <= {arith['raw_steps']:.0f}; chosen N = {n} (multiple of {args.round_to}, cap {args.max_steps}); "
          f"predicted {arith['predicted_s']:.0f} s, longest run {arith['longest_run_s']:.0f} s; timing took "
          f"{arith['timing_s']:.0f} s")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                       "torch": torch.__version__, "args": vars(args), "timings": rows, "plan": arith}, f, indent=1)
    if n == 0:
        print("no step budget fits: shrink the set or raise the budget", file=sys.stderr)
    print(f"STEPS={n}")
    return 0 if n > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
