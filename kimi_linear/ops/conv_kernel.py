"""Triton kernels of the causal short convolution: a decode step (window updated in place) and a whole
sequence (prefill). Imported lazily (needs Triton).

Decode step, grid ``(B, cdiv(D, BD))``: one program per (batch row, block of BD channels) loads the
row's window ``[BD, W-1]``, the new input and the filters, writes ``y = act(window . w[:W-1] + x w[W-1])``
and shifts the window by one with x appended. Replaces the PyTorch step's ~7 launches (cat, multiply,
sum, activation, casts, slice, copy back) per conv with one, which matters in a decode step that runs
three convs per KDA layer.

Whole sequence, grid ``(cdiv(T, BT), cdiv(D, BD), B)``: one program per (block of BT tokens, block of BD
channels, batch row) sums its W shifted input tiles (the previous W-1 tokens of a block are re-read
from L1/L2, not from HBM), reads the carried window where a shift reaches before token 0, and the
first token block also writes the final window. One launch, reading x once and writing y once,
replaces the PyTorch form's transpose, pad or cat, cuDNN's generic depthwise kernel, activation and
casts (H100, hybrid 4K prefill: 10.6 ms of depthwise conv plus 9 ms of window ``cat`` over 20 KDA
layers, session 6's prefill profile).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kimi_linear.ops.pdl import pdl_launch
from kimi_linear.ops.pdl_kernel import wait_for_previous_grid


@triton.jit
def _conv_update_kernel(x, window, weight, bias, y, D, stride_xb,
                        W: tl.constexpr, WP: tl.constexpr, BD: tl.constexpr,
                        HAS_BIAS: tl.constexpr, SILU: tl.constexpr, PDL: tl.constexpr, TRIGGER: tl.constexpr = True):
    wait_for_previous_grid(PDL, TRIGGER)  # programmatic dependent launch (ops/pdl.py)
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
        W=W, WP=triton.next_power_of_2(W), BD=BD, HAS_BIAS=bias is not None, SILU=silu, num_warps=4,
        **pdl_launch(x2.device, "conv"))
    return y


@triton.jit
def _conv_seq_kernel(x, window, weight, bias, y, final, T, D, stride_xb, stride_xt,
                     W: tl.constexpr, WP: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
                     HAS_WINDOW: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
                     WRITE_FINAL: tl.constexpr):
    i_t = tl.program_id(0)
    i_d = tl.program_id(1)
    i_b = tl.program_id(2).to(tl.int64)
    o_t = i_t * BT + tl.arange(0, BT)
    o_d = i_d * BD + tl.arange(0, BD)
    m_d = o_d < D
    m_t = o_t < T
    p_x = x + i_b * stride_xb + o_d[None, :]
    acc = tl.zeros([BT, BD], dtype=tl.float32)
    for j in tl.static_range(W):  # tap j reads the input j tokens back, with filter column W-1-j
        src = o_t - j
        b_x = tl.load(p_x + src[:, None].to(tl.int64) * stride_xt, mask=((src >= 0) & m_t)[:, None] & m_d[None, :],
                      other=0).to(tl.float32)
        b_tap = tl.load(weight + o_d * W + (W - 1 - j), mask=m_d, other=0).to(tl.float32)
        acc += b_x * b_tap[None, :]
    if HAS_WINDOW:
        if i_t == 0:
            # the first W-1 tokens also reach into the carried window: its column c (oldest first) is the
            # input at position c-(W-1), which token t <= c meets through filter column c-t. One [BD]
            # column at a time (the window is [B, D, W-1], strided along D), then put on its row.
            for c in tl.static_range(W - 1):
                b_col = tl.load(window + (i_b * D + o_d) * (W - 1) + c, mask=m_d, other=0).to(tl.float32)
                for t in tl.static_range(c + 1):
                    b_tap = tl.load(weight + o_d * W + (c - t), mask=m_d, other=0).to(tl.float32)
                    acc += tl.where((o_t == t)[:, None], (b_col * b_tap)[None, :], 0.0)
    if HAS_BIAS:
        acc += tl.load(bias + o_d, mask=m_d, other=0).to(tl.float32)[None, :]
    if SILU:
        acc = acc * tl.sigmoid(acc)
    tl.store(y + (i_b * T + o_t[:, None]) * D + o_d[None, :], acc.to(y.dtype.element_ty), mask=m_t[:, None] & m_d[None, :])
    if WRITE_FINAL:
        if i_t == 0:
            # final window column i = input at position T-(W-1)+i: from x, or (T < W-1) the carried window
            o_w = tl.arange(0, WP)
            pos = T - (W - 1) + o_w
            m_fin = (o_w < W - 1)[None, :] & m_d[:, None]
            b_fin = tl.load(x + i_b * stride_xb + o_d[:, None] + pos[None, :].to(tl.int64) * stride_xt,
                            mask=m_fin & (pos >= 0)[None, :], other=0)
            if HAS_WINDOW:
                b_prev = tl.load(window + (i_b * D + o_d[:, None]) * (W - 1) + (W - 1 + pos[None, :]),
                                 mask=m_fin & (pos < 0)[None, :], other=0)
                b_fin = tl.where((pos >= 0)[None, :], b_fin, b_prev.to(b_fin.dtype))
            tl.store(final + (i_b * D + o_d[:, None]) * (W - 1) + o_w[None, :], b_fin.to(final.dtype.element_ty),
                     mask=m_fin)


def conv_seq_triton(x: torch.Tensor, weight2: torch.Tensor, bias: torch.Tensor | None, silu: bool,
                    window: torch.Tensor | None, output_final_window: bool
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``x [B, T, D]`` (channels contiguous, rows may be strided), ``weight2 [D, W]``, ``window
    [B, D, W-1]`` or None (zeros). Returns ``(y [B, T, D]`` in x's dtype, ``final [B, D, W-1]`` in x's
    dtype or None): fp32 sums, rounded once."""
    B, T, D = x.shape
    W = weight2.shape[1]
    if x.stride(2) != 1:
        x = x.contiguous()
    if window is not None:
        window = window.contiguous()
    y = torch.empty(B, T, D, dtype=x.dtype, device=x.device)
    final = torch.empty(B, D, W - 1, dtype=x.dtype, device=x.device) if output_final_window else None
    if B == 0 or D == 0 or (T == 0 and final is None):
        return y, final
    BT, BD = 32, 128
    grid = (max(1, triton.cdiv(T, BT)), triton.cdiv(D, BD), B)
    _conv_seq_kernel[grid](
        x, window if window is not None else x, weight2.contiguous(), bias if bias is not None else x, y,
        final if final is not None else y, T, D, x.stride(0), x.stride(1),
        W=W, WP=triton.next_power_of_2(max(W - 1, 1)), BT=BT, BD=BD, HAS_WINDOW=window is not None,
        HAS_BIAS=bias is not None, SILU=silu, WRITE_FINAL=final is not None, num_warps=4)
    return y, final
