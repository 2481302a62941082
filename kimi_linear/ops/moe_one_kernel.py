"""The one-token (batch-1 decoding) MoE kernels of :mod:`kimi_linear.ops.moe_decode`; imported lazily
(needs Triton).

A token's "slots" are its ``K`` chosen experts, then the shared ones (weight 1). Two launches:
``gate_up_one_kernel`` (grid ``[J, I / BLOCK_R]``: SwiGLU rows of every slot into ``h [J, I]``), then
``down_one_kernel`` (grid ``[D / BLOCK_R]``: output rows, every slot's down projection summed with its
combine weight, the residual added). Each kernel's program is a row block of its product, written as a
helper of its own (``_gate_up_rows``, ``_down_rows``).

Both products in one persistent launch (programs walking the gate/up blocks, a device-wide count, then
the down rows) measured slower on the H100 and was removed (docs/decode.md, session 30; commit cfd9aed).
"""

from __future__ import annotations

import triton
import triton.language as tl

from kimi_linear.ops.pdl_kernel import wait_for_previous_grid


@triton.jit
def _slot_expert(idx_ptr, j, K, ER):
    """Expert of slot ``j``: the token's ``j``-th choice for ``j < K``, else shared expert ``j - K``
    (stored after the ``ER`` routed ones in the weight tables)."""
    return tl.where(j < K, tl.load(idx_ptr + tl.minimum(j, K - 1)), ER + j - K)


@triton.jit
def _gate_up_rows(x_ptr, idx_ptr, w1_tab, w3_tab, h_ptr, nw_ptr, j, rb, D, I, K, ER, eps,
                  BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, W_ALIGN: tl.constexpr,
                  NORM: tl.constexpr, X_CACHE: tl.constexpr):
    """``h[j, rows] = silu(w1_e x) * (w3_e x)`` for row block ``rb`` of slot ``j`` (``BLOCK_R`` rows of
    ``I``). ``W_ALIGN``: the experts' address alignment in bytes (an address read from a table is of
    unknown alignment otherwise). ``NORM``: x is un-normalised; the sums are of ``x * nw``, scaled by
    ``rstd`` before the SwiGLU (a product is linear in its input). ``X_CACHE`` ".cg": x read from L2,
    never from the SM's L1, which a program that has not yet waited for the previous grid may not rely on."""
    e = _slot_expert(idx_ptr, j, K, ER)
    w1 = tl.multiple_of(tl.load(w1_tab + e).to(tl.pointer_type(x_ptr.dtype.element_ty)), W_ALIGN)
    w3 = tl.multiple_of(tl.load(w3_tab + e).to(tl.pointer_type(x_ptr.dtype.element_ty)), W_ALIGN)
    o_r = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    m_r = o_r < I
    acc1 = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc3 = tl.zeros([BLOCK_R], dtype=tl.float32)
    b_ss = 0.0  # NORM: sum of x^2 (a scalar: a [BLOCK_D] accumulator cost registers, hence occupancy)
    for d0 in range(0, D, BLOCK_D):
        o_d = d0 + tl.arange(0, BLOCK_D)
        m = m_r[:, None] & ((o_d[None, :] < D) | EVEN_D)
        b_x = tl.load(x_ptr + o_d, mask=(o_d < D) | EVEN_D, other=0.0, cache_modifier=X_CACHE).to(tl.float32)
        if NORM:
            b_ss += tl.sum(b_x * b_x, 0)
            b_x = b_x * tl.load(nw_ptr + o_d, mask=(o_d < D) | EVEN_D, other=0.0).to(tl.float32)
        p_w = o_r[:, None].to(tl.int64) * D + o_d[None, :]
        acc1 += tl.sum(tl.load(w1 + p_w, mask=m, other=0.0).to(tl.float32) * b_x[None, :], 1)
        acc3 += tl.sum(tl.load(w3 + p_w, mask=m, other=0.0).to(tl.float32) * b_x[None, :], 1)
    if NORM:
        rstd = tl.rsqrt(b_ss / D + eps)
        acc1 *= rstd
        acc3 *= rstd
    h = acc1 * tl.sigmoid(acc1) * acc3
    tl.store(h_ptr + j * I + o_r, h.to(h_ptr.dtype.element_ty), mask=m_r)


@triton.jit
def _down_rows(h_ptr, idx_ptr, cw_ptr, w2_tab, y_ptr, res_ptr, rb, D, I, K, ER,
               J: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr, W_ALIGN: tl.constexpr,
               RESIDUAL: tl.constexpr):
    """``y[rows] = sum_j c_j w2_e(j)[rows, :] . h_j`` for row block ``rb`` (``BLOCK_R`` rows of ``D``);
    the slot loop unrolled at compile time (``J`` is fixed per model) so every slot's loads can be in
    flight. ``RESIDUAL``: ``y = res + (that sum rounded to y's dtype)``, added in fp32 as the separate
    add would."""
    o_r = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    m_r = o_r < D
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    for j in tl.static_range(J):
        e = _slot_expert(idx_ptr, j, K, ER)
        c = tl.where(j < K, tl.load(cw_ptr + tl.minimum(j, K - 1)).to(tl.float32), 1.0)  # shared: weight 1
        w2 = tl.multiple_of(tl.load(w2_tab + e).to(tl.pointer_type(h_ptr.dtype.element_ty)), W_ALIGN)
        part = tl.zeros([BLOCK_R], dtype=tl.float32)
        for i0 in range(0, I, BLOCK_I):
            o_i = i0 + tl.arange(0, BLOCK_I)
            m_i = o_i < I
            b_h = tl.load(h_ptr + j * I + o_i, mask=m_i, other=0.0).to(tl.float32)
            b_w = tl.load(w2 + o_r[:, None].to(tl.int64) * I + o_i[None, :], mask=m_r[:, None] & m_i[None, :], other=0.0)
            part += tl.sum(b_w.to(tl.float32) * b_h[None, :], 1)
        acc += c * part
    if RESIDUAL:
        acc = acc.to(y_ptr.dtype.element_ty).to(tl.float32) + tl.load(res_ptr + o_r, mask=m_r, other=0.0).to(tl.float32)
    tl.store(y_ptr + o_r, acc.to(y_ptr.dtype.element_ty), mask=m_r)


@triton.jit
def gate_up_one_kernel(x_ptr, idx_ptr, w1_tab, w3_tab, h_ptr, nw_ptr, D, I, K, ER, eps,
                       BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
                       W_ALIGN: tl.constexpr, NORM: tl.constexpr, PDL: tl.constexpr,
                       EARLY: tl.constexpr, X_CACHE: tl.constexpr, TRIGGER: tl.constexpr = True):
    """Program ``(j, rb)``: :func:`_gate_up_rows`. EARLY (PDL, x written before the previous kernel, the
    router): the shared slots' programs need no routing and run before the wait, beside the router; they
    wait at the end, so that this grid still completes after the router (ops/pdl.py)."""
    j = tl.program_id(0)
    if EARLY:
        if j < K:
            wait_for_previous_grid(PDL, TRIGGER)
    else:
        wait_for_previous_grid(PDL, TRIGGER)  # ops/pdl.py
    _gate_up_rows(x_ptr, idx_ptr, w1_tab, w3_tab, h_ptr, nw_ptr, j, tl.program_id(1), D, I, K, ER, eps,
                  BLOCK_R, BLOCK_D, EVEN_D, W_ALIGN, NORM, X_CACHE)
    if EARLY:
        if j >= K:
            wait_for_previous_grid(PDL, TRIGGER)


@triton.jit
def down_one_kernel(h_ptr, idx_ptr, cw_ptr, w2_tab, y_ptr, res_ptr, D, I, K, ER,
                    J: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr, W_ALIGN: tl.constexpr,
                    RESIDUAL: tl.constexpr, PDL: tl.constexpr, TRIGGER: tl.constexpr = True):
    """Program ``rb``: :func:`_down_rows`."""
    wait_for_previous_grid(PDL, TRIGGER)
    _down_rows(h_ptr, idx_ptr, cw_ptr, w2_tab, y_ptr, res_ptr, tl.program_id(0), D, I, K, ER,
               J, BLOCK_R, BLOCK_I, W_ALIGN, RESIDUAL)
