"""Triton kernel for one decode step of the causal short convolution, window updated in place.

Imported lazily (needs Triton). One program per (batch row, block of BD channels): it loads the
row's window ``[BD, W-1]``, the new input and the filters, writes ``y = act(window . w[:W-1] + x w[W-1])``
and shifts the window by one with x appended. Replaces the PyTorch step's ~7 launches (cat, multiply,
sum, activation, casts, slice, copy back) per conv with one, which matters in a decode step that runs
three convs per KDA layer.

Launch grid: ``(B, cdiv(D, BD))``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _conv_update_kernel(x, window, weight, bias, y, D, stride_xb,
                        W: tl.constexpr, WP: tl.constexpr, BD: tl.constexpr,
                        HAS_BIAS: tl.constexpr, SILU: tl.constexpr):
    i_b = tl.program_id(0).to(tl.int64)
    o_d = tl.program_id(1) * BD + tl.arange(0, BD)
    o_w = tl.arange(0, WP)
    m_d = o_d < D
    p_win = window + (i_b * D + o_d[:, None]) * (W - 1) + o_w[None, :]
    b_x = tl.load(x + i_b * stride_xb + o_d, mask=m_d, other=0).to(tl.float32)
    b_win = tl.load(p_win, mask=m_d[:, None] & (o_w < W - 1)[None, :], other=0).to(tl.float32)
    b_full = tl.where((o_w == W - 1)[None, :], b_x[:, None], b_win)  # [BD, WP]: oldest .. newest
    b_w = tl.load(weight + o_d[:, None] * W + o_w[None, :], mask=m_d[:, None] & (o_w < W)[None, :], other=0)
    b_y = tl.sum(b_full * b_w.to(tl.float32), axis=1)
    if HAS_BIAS:
        b_y += tl.load(bias + o_d, mask=m_d, other=0).to(tl.float32)
    if SILU:
        b_y = b_y * tl.sigmoid(b_y)
    tl.store(y + i_b * D + o_d, b_y.to(y.dtype.element_ty), mask=m_d)
    # the shifted window: column i takes column i + 1, the last one takes x
    b_next = tl.load(p_win + 1, mask=m_d[:, None] & (o_w < W - 2)[None, :], other=0)
    b_next = tl.where((o_w == W - 2)[None, :], b_x[:, None].to(b_next.dtype), b_next)
    # every thread's loads of this row's window happen before any thread overwrites it
    tl.debug_barrier()
    tl.store(p_win, b_next.to(window.dtype.element_ty), mask=m_d[:, None] & (o_w < W - 1)[None, :])


def conv_update_triton(x2: torch.Tensor, window: torch.Tensor, weight2: torch.Tensor, bias: torch.Tensor | None,
                       silu: bool) -> torch.Tensor:
    """``x2 [B, D]`` (rows may be strided, channels contiguous), ``window [B, D, W-1]`` contiguous
    (updated in place), ``weight2 [D, W]``. Returns ``y [B, D]`` in x's dtype."""
    B, D = x2.shape
    W = weight2.shape[1]
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    y = torch.empty(B, D, dtype=x2.dtype, device=x2.device)
    if B == 0 or D == 0:
        return y
    BD = 128
    _conv_update_kernel[(B, triton.cdiv(D, BD))](
        x2, window, weight2.contiguous(), bias if bias is not None else x2, y, D, x2.stride(0),
        W=W, WP=triton.next_power_of_2(W), BD=BD, HAS_BIAS=bias is not None, SILU=silu, num_warps=4)
    return y
