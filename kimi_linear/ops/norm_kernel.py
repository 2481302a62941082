"""Triton inference kernels for :mod:`kimi_linear.ops.norm` (imported lazily: needs Triton).

One launch per norm instead of PyTorch's chain of casts, the fused RMS reduction, sigmoid and
multiplies (4-7 launches): a decode step runs ~80 norms on a few KB each, where launches, not bytes,
set the time. Forward only; the ops use these kernels only when no gradient is needed. The rounding
order is the ops' own: plain norm rounds the normalised value to x's dtype before the weight
multiplies it; the gated norm stays in fp32 until the final cast.

Launch grid: ``(cdiv(R, BR),)`` over the ``R`` rows of ``x.reshape(-1, D)``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kimi_linear.ops.pdl import pdl_launch
from kimi_linear.ops.pdl_kernel import wait_for_previous_grid


@triton.jit
def _rms_norm_fwd_kernel(x, gate, weight, y, res, s, R, eps, D: tl.constexpr, DP: tl.constexpr, BR: tl.constexpr,
                         GATED: tl.constexpr, RESIDUAL: tl.constexpr, PDL: tl.constexpr, TRIGGER: tl.constexpr = True):
    wait_for_previous_grid(PDL, TRIGGER)  # programmatic dependent launch (ops/pdl.py)
    o_r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    o_d = tl.arange(0, DP)
    m = (o_r < R)[:, None] & (o_d < D)[None, :]
    p = o_r[:, None] * D + o_d[None, :]
    b_x = tl.load(x + p, mask=m, other=0).to(tl.float32)
    if RESIDUAL:  # s = x + res, rounded to x's dtype as a separate add would be, then normalised
        b_s = (b_x + tl.load(res + p, mask=m, other=0).to(tl.float32)).to(s.dtype.element_ty)
        tl.store(s + p, b_s, mask=m)
        b_x = b_s.to(tl.float32)
    b_w = tl.load(weight + o_d, mask=o_d < D, other=0).to(tl.float32)
    b_n = b_x * tl.rsqrt(tl.sum(b_x * b_x, axis=1) / D + eps)[:, None]
    if GATED:
        b_g = tl.load(gate + p, mask=m, other=0).to(tl.float32)
        b_y = b_n * b_w[None, :] * tl.sigmoid(b_g)
    else:
        b_y = b_n.to(y.dtype.element_ty).to(tl.float32) * b_w[None, :]
    tl.store(y + p, b_y.to(y.dtype.element_ty), mask=m)


def rms_norm_fwd_triton(x: torch.Tensor, weight: torch.Tensor, eps: float, gate: torch.Tensor | None = None,
                        residual: torch.Tensor | None = None):
    """``x [..., D]`` (and ``gate`` of the same shape) -> ``[..., D]`` in x's dtype. With ``residual``
    (x's shape and dtype): returns ``(x + residual, rms_norm(x + residual))``."""
    D = x.shape[-1]
    x2 = x.reshape(-1, D).contiguous()
    g2 = gate.reshape(-1, D).contiguous() if gate is not None else x2
    r2 = residual.reshape(-1, D).contiguous() if residual is not None else x2
    y = torch.empty_like(x2)
    s = torch.empty_like(x2) if residual is not None else y
    R = x2.shape[0]
    if R > 0:
        DP = triton.next_power_of_2(D)
        BR = max(1, min(16, 4096 // DP))  # rows per program: a few KB of fp32 per program
        _rms_norm_fwd_kernel[(triton.cdiv(R, BR),)](x2, g2, weight.contiguous(), y, r2, s, R, eps, D=D, DP=DP, BR=BR,
                                                  GATED=gate is not None, RESIDUAL=residual is not None,
                                                  num_warps=4 if DP * BR <= 4096 else 8, **pdl_launch(x2.device, "rms_norm"))
    return (s.view(x.shape), y.view(x.shape)) if residual is not None else y.view(x.shape)


@triton.jit
def _rms_norm_store_kernel(x, weight, start, out, src, dst, eps, stride_x, stride_src, L,
                           D: tl.constexpr, DP: tl.constexpr, E: tl.constexpr, EP: tl.constexpr, COPY: tl.constexpr,
                           PDL: tl.constexpr, TRIGGER: tl.constexpr = True):
    # token b's normalised row (rounded like rms_norm: to x's dtype before the weight, the product to
    # x's dtype) goes to row b * L + start[b] of out; with COPY, src's row b to the same row of dst
    wait_for_previous_grid(PDL, TRIGGER)
    b = tl.program_id(0).to(tl.int64)
    row = b * L + tl.load(start + b).to(tl.int64)
    o_d = tl.arange(0, DP)
    m_d = o_d < D
    b_x = tl.load(x + b * stride_x + o_d, mask=m_d, other=0).to(tl.float32)
    b_n = b_x * tl.rsqrt(tl.sum(b_x * b_x, axis=0) / D + eps)
    b_w = tl.load(weight + o_d, mask=m_d, other=0).to(tl.float32)
    b_y = (b_n.to(x.dtype.element_ty).to(tl.float32) * b_w).to(x.dtype.element_ty)
    tl.store(out + row * D + o_d, b_y.to(out.dtype.element_ty), mask=m_d)
    if COPY:
        o_e = tl.arange(0, EP)
        m_e = o_e < E
        b_s = tl.load(src + b * stride_src + o_e, mask=m_e, other=0)
        tl.store(dst + row * E + o_e, b_s.to(dst.dtype.element_ty), mask=m_e)


def rms_norm_store_triton(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor, start: torch.Tensor,
                          copy: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """One launch of :func:`kimi_linear.ops.norm.rms_norm_store_` (arguments validated there)."""
    B, D = x.shape
    L = out.shape[1]
    src, dst = copy if copy is not None else (x, out)
    E = src.shape[1] if copy is not None else 1
    _rms_norm_store_kernel[(B,)](x, weight, start, out, src, dst, eps, x.stride(0), src.stride(0), L,
                                 D=D, DP=triton.next_power_of_2(D), E=E, EP=triton.next_power_of_2(E),
                                 COPY=copy is not None, num_warps=4, **pdl_launch(x.device, "rms_norm_store"))
