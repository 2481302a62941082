"""RMS normalisation, plain and sigmoid-gated (the KDA output norm).

| tensor | shape        | notes                                     |
|--------|--------------|-------------------------------------------|
| x      | ``[..., D]`` | any float dtype; statistics in fp32       |
| weight | ``[D]``      |                                           |
| gate   | ``[..., D]`` | same shape as x (gated form only)         |
| return | ``[..., D]`` | dtype of x                                |

:func:`rms_norm_store_` normalises one token per row straight into a cache (the MLA decode step's latent).

:func:`add_rms_norm` also adds a residual first (``s = x + delta``, returned with its norm): the pre-norm
block's second residual add and norm in one launch at decode time.

``backend="auto"`` takes a one-launch Triton kernel on CUDA when no gradient is needed (inference,
decode); otherwise, and on CPU, the PyTorch form below (differentiable).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kimi_linear.backends import resolve_backend

__all__ = ["rms_norm", "add_rms_norm", "gated_rms_norm", "rms_norm_store_"]


def _check(x: torch.Tensor, weight: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError("x and weight must be tensors")
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"weight must be [D={x.shape[-1]}], got shape {tuple(weight.shape)}")
    if weight.device != x.device:
        raise ValueError(f"weight must be on x's device {x.device}, got {weight.device}")


def _use_kernel(backend: str, *tensors: torch.Tensor) -> bool:
    """Take the Triton inference kernel? Only where Triton runs and no gradient is needed."""
    x = tensors[0]
    chosen = resolve_backend(backend, x.device)  # also rejects an unknown name whatever the inputs
    if x.dtype == torch.float64 or x.numel() == 0:
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    return chosen == "triton"


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *, backend: str = "auto") -> torch.Tensor:
    """``weight * x / sqrt(mean(x^2) + eps)``.

    The normalised value is rounded to x's dtype before the weight multiplies it, the order the
    released model (and transformers) use, so bf16 results match theirs bit for bit on CPU (on CUDA
    the fused reduction may differ from an unfused one in the last fp32 bit before that rounding).
    """
    _check(x, weight)
    if _use_kernel(backend, x, weight):
        from kimi_linear.ops.norm_kernel import rms_norm_fwd_triton

        return rms_norm_fwd_triton(x, weight, eps)
    xf = x.float() if x.dtype != torch.float64 else x
    # F.rms_norm: one fused kernel on CUDA instead of five (pow, mean, add, rsqrt, mul); a decode step
    # runs ~80 of these norms, where kernel count, not bytes, sets the time
    normed = F.rms_norm(xf, (xf.shape[-1],), eps=eps)
    return (weight * normed.to(x.dtype)).to(x.dtype)


def rms_norm_store_(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor, start: torch.Tensor, *,
                    copy: tuple[torch.Tensor, torch.Tensor] | None = None, backend: str = "auto") -> None:
    """``out[b, start[b]] = rms_norm(x[b])`` for ``x [B, D]`` into ``out [B, L, D]`` (cast to out's dtype),
    and with ``copy = (src [B, E], dst [B, L, E])`` also ``dst[b, start[b]] = src[b]``: the latent cache
    write of one MLA decode step (normalised latent and shared key part) in one launch instead of a norm
    and two scatters. ``x`` and ``src`` may be column slices of one buffer (unit column stride). Values
    are those of :func:`rms_norm` followed by the cast. ``start`` values must lie in ``[0, L)``
    (not checked: a device sync)."""
    _check(x, weight)
    B = x.shape[0]
    if x.dim() != 2 or out.dim() != 3 or out.shape[0] != B or out.shape[2] != x.shape[1]:
        raise ValueError(f"need x [B, D] and out [B, L, D], got {tuple(x.shape)} and {tuple(out.shape)}")
    if start.shape != (B,) or start.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"start must be an int tensor [B={B}], got {tuple(start.shape)} {start.dtype}")
    if copy is not None:
        src, dst = copy
        if src.dim() != 2 or src.shape[0] != B or dst.dim() != 3 or dst.shape[:2] != out.shape[:2] or dst.shape[2] != src.shape[1]:
            raise ValueError(f"copy needs src [B, E] and dst [B, L, E] (out's B, L), got {tuple(src.shape)} and "
                             f"{tuple(dst.shape)}")
    for name, t in (("out", out), ("start", start), *((("src", copy[0]), ("dst", copy[1])) if copy is not None else ())):
        if t.device != x.device:
            raise ValueError(f"{name} must be on x's device {x.device}, got {t.device}")
    if not out.is_floating_point() or (copy is not None and not copy[1].is_floating_point()):
        raise ValueError(f"out and dst must be floating point, got {out.dtype}"
                         + (f" and {copy[1].dtype}" if copy is not None else ""))
    tensors = (x, weight) if copy is None else (x, weight, copy[0])
    if (_use_kernel(backend, *tensors) and x.stride(1) == 1 and out.is_contiguous()
            and (copy is None or (copy[0].stride(1) == 1 and copy[1].is_contiguous()))):
        from kimi_linear.ops.norm_kernel import rms_norm_store_triton

        rms_norm_store_triton(x, weight, eps, out, start, copy)
        return
    rows = torch.arange(B, device=x.device)
    out[rows, start] = rms_norm(x, weight, eps, backend="reference").to(out.dtype)
    if copy is not None:
        copy[1][rows, start] = copy[0].to(copy[1].dtype)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *,
                 backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """``s = x + delta`` (in x's dtype) and ``rms_norm(s, weight)``: returns ``(s, normed)``, the same
    values as the two steps apart (the kernel rounds the sum to x's dtype before normalising it)."""
    _check(x, weight)
    if delta.shape != x.shape or delta.device != x.device or delta.dtype != x.dtype:
        raise ValueError(f"delta must match x ({tuple(x.shape)}, {x.dtype}, {x.device}), "
                         f"got {tuple(delta.shape)}, {delta.dtype}, {delta.device}")
    if _use_kernel(backend, x, delta, weight):
        from kimi_linear.ops.norm_kernel import rms_norm_fwd_triton

        return rms_norm_fwd_triton(x, weight, eps, residual=delta)
    s = x + delta
    return s, rms_norm(s, weight, eps, backend="reference")


def gated_rms_norm(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *,
                   backend: str = "auto") -> torch.Tensor:
    """``rms_norm(x) * sigmoid(gate)``, all in fp32 (weight included), then cast to x's dtype."""
    _check(x, weight)
    if gate.shape != x.shape or gate.device != x.device:
        raise ValueError(f"gate must have x's shape {tuple(x.shape)} and device {x.device}, "
                         f"got {tuple(gate.shape)} on {gate.device}")
    if _use_kernel(backend, x, gate, weight):
        from kimi_linear.ops.norm_kernel import rms_norm_fwd_triton

        return rms_norm_fwd_triton(x, weight, eps, gate=gate)
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(compute)
    normed = F.rms_norm(xf, (xf.shape[-1],), weight.to(compute), eps=eps)
    return (normed * torch.sigmoid(gate.to(compute))).to(x.dtype)
