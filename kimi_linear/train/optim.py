"""AdamW parameter groups and learning-rate schedules.

Weight decay pulls weights toward zero; applied to the KDA gate parameters (``A_log``: the decay
rate, ``dt_bias``: the gate's softplus bias), to norm weights (whose neutral value is 1, not 0) or
to biases, it would bias the model toward particular gates and scales rather than regularise. So
these get ``weight_decay = 0``; every other matrix (projections, experts, embeddings, head) decays.

Master weights: the model's parameters stay fp32 and autocast runs the matmuls in bf16 on GPU, so
the optimizer always updates fp32 weights (no separate master copy needed).

Schedules (``lr(step)`` for step = 0, 1, ..., total-1; warmup is linear from lr/warmup to lr):
- cosine:   warmup, then cosine from lr down to ``min_lr_ratio * lr`` at the last step.
- wsd:      warmup, hold lr, then in the last ``decay_fraction`` of steps decay linearly to min.
- constant: warmup, then lr.
"""

from __future__ import annotations

import math

import torch

NO_DECAY_NAMES = ("A_log", "dt_bias", "e_score_correction_bias")


def is_no_decay(name: str, param: torch.Tensor) -> bool:
    """True for gate parameters, norm weights and biases (see the module docstring)."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf in NO_DECAY_NAMES or leaf == "bias":
        return True
    if "norm" in name.lower():  # RMSNorm / gated norm weights (q/kv_a_layernorm, o_norm, input_layernorm, ...)
        return True
    return param.dim() < 2


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed matrices and everything in :func:`is_no_decay`."""
    decay, no_decay = [], []
    decay_names, no_decay_names = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if is_no_decay(name, p):
            no_decay.append(p)
            no_decay_names.append(name)
        else:
            decay.append(p)
            decay_names.append(name)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay, "names": decay_names})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "names": no_decay_names})
    if not groups:
        raise ValueError("the model has no trainable parameters")
    return groups


def build_optimizer(model: torch.nn.Module, *, lr: float, weight_decay: float, betas: tuple[float, float],
                    eps: float) -> torch.optim.AdamW:
    groups = param_groups(model, weight_decay)
    for g in groups:
        g.pop("names")
    # foreach=False keeps CPU results bit-identical between a run and its resumed continuation
    # regardless of how tensors get grouped; the cost is negligible at our sizes on CPU.
    use_foreach = any(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, foreach=use_foreach)


def lr_at(step: int, *, total: int, lr: float, warmup: int, schedule: str, min_lr_ratio: float,
          decay_fraction: float = 0.2, fraction: float | None = None) -> float:
    """Learning rate for optimizer step ``step`` (0-based) of ``total``.

    ``fraction`` (time-budget runs): the share of the budget already used, in [0, 1]; it replaces
    ``step / total`` as the position in the schedule after warmup (warmup still counts steps).
    """
    if step < warmup:
        return lr * (step + 1) / warmup
    lo = lr * min_lr_ratio
    if schedule == "constant":
        return lr
    if fraction is not None:
        f = min(1.0, max(0.0, fraction))
        if schedule == "cosine":
            return lo + 0.5 * (lr - lo) * (1 + math.cos(math.pi * f))
        if schedule == "wsd":
            start = 1.0 - decay_fraction
            return lr if f < start else lr + (lo - lr) * (f - start) / decay_fraction
    if schedule == "cosine":
        span = max(1, total - warmup - 1)
        t = min(1.0, (step - warmup) / span)
        return lo + 0.5 * (lr - lo) * (1 + math.cos(math.pi * t))
    if schedule == "wsd":
        decay_steps = max(1, int(round(total * decay_fraction)))
        start = max(warmup, total - decay_steps)
        if step < start:
            return lr
        t = min(1.0, (step - start + 1) / max(1, total - start))
        return lr + (lo - lr) * t
    raise ValueError(f"unknown schedule {schedule!r} (expected cosine, wsd or constant)")
