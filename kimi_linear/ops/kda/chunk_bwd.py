"""Triton backward of chunked KDA (imported lazily: needs Triton). Derivation: docs/kernels.md.

Per chunk (one value head), the forward computed (docs/kda.md steps 2-7)

    Qg = e^G q,  Kd = e^{G_last - G} k,  X = [beta v | beta e^G k],  [U | Wk] = M X,  M = (I + beta Araw)^-1
    W = U - Wk S,   O = scale (Qg S + Aqk W),   S_next = e^{G_last} S + Kd^T W

Stages of the backward:

| stage          | grid           | computes                                                          |
|----------------|----------------|-------------------------------------------------------------------|
| dW local       | (NC, HV, V/64) | optional (launch table dw_local): dW = scale Aqk^T dO ahead of the scan |
| state scan     | (V/BV, N*HV)   | dS from the last chunk to the first: dh per chunk, dW, dh0        |
| chunk grads    | (NC, HV,       | dense parts of dq/dk/dG per key block; one more program per chunk |
|                |  K/64 + 1)     | for dv, dAqk (v_apart; else key block 0 does them); dA and dbeta  |
|                |                | as per-program partial sums                                       |
| finish         | (NC, HV)       | sums the partials; dbeta (+ sigmoid'), dAraw = beta dA            |
| decay products | (4NC, HV, K/BK)| the Araw/Aqk parts of dq/dk/dG (exact sub-chunk form), one program |
|                |                | per 16-row sub-chunk                                              |
| gate grads     | (NC, HV, K/32) | dg = reverse cumsum of dG over the chunk, fused gate backward     |
|                |                | (raw gate, A_log, dt_bias partials)                               |
| gate params    | (HV,)          | dA_log and ddt_bias: the partials summed over chunks               |
| l2norm         | (rows/16, 2)   | fused q/k norm: dq and dk through the norm, one launch (here, or   |
|                |                | in chunk.py after the GVA sum; merged with the gate grads: option) |
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kimi_linear.ops.kda import chunk_common
from kimi_linear.ops.kda.chunk_common import GATE_FLOOR, LAUNCH, ChunkTable, launch, pow2, scan_launch
from kimi_linear.ops.kda.chunk_fwd import (
    L2NORM_ROWS,
    chunk_head_block,
    chunk_place,
    dot_precision,
    load_beta,
    lower_triangle,
    same_shape_dtype,
    scan_program,
    sequence_chunks,
    softplus_f32,
)
from kimi_linear.ops.kda.fast_exp import exp


@triton.jit
def _state_bwd_kernel(Qg, Kd, G, Aqk, Wk, do, dht, dh, dW, dh0, seq_start, chunk_first, scale,
                      HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                      KP: tl.constexpr, BV: tl.constexpr, HAS_DHT: tl.constexpr,
                      STORE_DH0: tl.constexpr, PREC: tl.constexpr, DW_LOCAL: tl.constexpr):
    # dW = scale Aqk^T dO + Kd dS_next;  dS = e^{G_last} dS_next + scale Qg^T dO - Wk^T dW.
    # DW_LOCAL: dW already holds scale Aqk^T dO (_dw_local_kernel, fully parallel), so the sequential
    # loop neither loads the fp32 Aqk tile nor runs its dot.
    DT: tl.constexpr = Wk.dtype.element_ty
    i_n, i_hv, o_k, o_v, o_t = scan_program(HV, KP, BV)
    m_k = o_k < K
    m_kv = m_k[:, None] & (o_v < V)[None, :]
    p_state = (i_n.to(tl.int64) * HV + i_hv) * K * V + o_k[:, None] * V + o_v[None, :]
    b_dS = tl.zeros([KP, BV], dtype=tl.float32)
    if HAS_DHT:
        b_dS = tl.load(dht + p_state, mask=m_kv, other=0).to(tl.float32)
    c0, c1, bos, eos = sequence_chunks(seq_start, chunk_first, i_n)
    for j in range(0, c1 - c0):
        c = c1 - 1 - j
        t0 = bos + (c - c0) * 64
        n = tl.minimum(eos - t0, 64)
        tl.store(dh + ((c * HV + i_hv) * K + o_k[:, None]) * V + o_v[None, :],
                 b_dS.to(dh.dtype.element_ty), mask=m_kv)
        m_t = o_t < n
        m_tk = m_t[:, None] & m_k[None, :]
        m_tv = m_t[:, None] & (o_v < V)[None, :]
        p_tk = ((t0 + o_t[:, None]) * HV + i_hv) * K + o_k[None, :]
        p_tv = ((t0 + o_t[:, None]) * HV + i_hv) * V + o_v[None, :]
        b_do = tl.load(do + p_tv, mask=m_tv, other=0)
        b_gl = tl.load(G + ((t0 + n - 1) * HV + i_hv) * K + o_k, mask=m_k, other=0)
        b_kd = tl.load(Kd + p_tk, mask=m_tk, other=0)
        b_qg = tl.load(Qg + p_tk, mask=m_tk, other=0)
        b_wk = tl.load(Wk + p_tk, mask=m_tk, other=0)
        if DW_LOCAL:
            b_dw = tl.load(dW + p_tv, mask=m_tv, other=0).to(tl.float32)
        else:
            b_a = tl.load(Aqk + ((t0 + o_t[:, None]) * HV + i_hv) * 64 + o_t[None, :], mask=lower_triangle(o_t, n),
                          other=0)
            # (in Aqk's storage type: fp32, or bf16 with half_store aqk)
            b_dw = scale * tl.dot(tl.trans(b_a), b_do.to(b_a.dtype), input_precision=PREC)
        b_dw += tl.dot(b_kd, b_dS.to(DT), input_precision=PREC)
        tl.store(dW + p_tv, b_dw, mask=m_tv)
        b_dS = (b_dS * exp(b_gl)[:, None] + scale * tl.dot(tl.trans(b_qg), b_do.to(DT), input_precision=PREC)
                - tl.dot(tl.trans(b_wk), b_dw.to(DT), input_precision=PREC))
    if STORE_DH0:
        tl.store(dh0 + p_state, b_dS, mask=m_kv)


@triton.jit
def _dw_local_kernel(Aqk, do, dW, chunk_start, chunk_len, scale,
                     HV: tl.constexpr, V: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
                     FULL: tl.constexpr = False):
    # The part of dW that does not depend on the state gradient, dW = scale Aqk^T dO, one program per
    # (chunk, value head, V block), ahead of the state-gradient scan (which then adds Kd dS).
    i_c = tl.program_id(0)
    i_hv = tl.program_id(1).to(tl.int64)
    o_v = tl.program_id(2) * BV + tl.arange(0, BV)
    t0, n = chunk_place(chunk_start, chunk_len, i_c, FULL)
    o_t = tl.arange(0, 64)
    m_t = o_t < n
    m_tv = m_t[:, None] & (o_v < V)[None, :]
    p_tv = ((t0 + o_t[:, None]) * HV + i_hv) * V + o_v[None, :]
    b_a = tl.load(Aqk + ((t0 + o_t[:, None]) * HV + i_hv) * 64 + o_t[None, :], mask=lower_triangle(o_t, n), other=0)
    b_do = tl.load(do + p_tv, mask=m_tv, other=0)
    tl.store(dW + p_tv, scale * tl.dot(tl.trans(b_a), b_do.to(b_a.dtype), input_precision=PREC), mask=m_tv)


@triton.jit
def _v_tile_grads(b_do, b_w, b_dw, b_M, b_beta, U, v, dv, p_tv, m_tv, b_daqk, b_da, b_db, PREC: tl.constexpr):
    """The V-only terms of one [64, BV] V tile: dAqk += dO W^T; U = M (beta V), so dX_v = M^T dU (dU = dW),
    dv = beta dX_v (stored here), dbeta += <dX_v, v> and dA -= dX_v U^T."""
    b_daqk += tl.dot(b_do, tl.trans(b_w), input_precision=PREC)
    b_u = tl.load(U + p_tv, mask=m_tv, other=0).to(tl.float32)
    b_v = tl.load(v + p_tv, mask=m_tv, other=0).to(tl.float32)
    b_dxv = tl.dot(tl.trans(b_M), b_dw, input_precision=PREC)
    tl.store(dv + p_tv, (b_dxv * b_beta[:, None]).to(dv.dtype.element_ty), mask=m_tv)
    b_db += tl.sum(b_dxv * b_v, axis=1)
    b_da -= tl.dot(b_dxv, tl.trans(b_u), input_precision=PREC)
    return b_daqk, b_da, b_db


@triton.jit
def _v_only_program(v, beta, M, U, W, do, dW, dv, dA_part, db_part, dAqk, t0, n, i_hv, o_t, p_part, scale,
                    HV: tl.constexpr, V: tl.constexpr, BV: tl.constexpr, BETA_SIGMOID: tl.constexpr,
                    PREC: tl.constexpr, HALF_DOTS: tl.constexpr):
    """``chunk_grad v_apart``: the V-only work of a (chunk, value head) in a program of its own -- dv,
    dAqk, and the U-parts of dA and dbeta (into partial-sum slot ``p_part``). HALF_DOTS: dO W^T on the
    stored half tiles (see ``_key_block_program``)."""
    m_t = o_t < n
    p_cc = ((t0 + o_t[:, None]) * HV + i_hv) * 64 + o_t[None, :]
    b_M = tl.load(M + p_cc, mask=lower_triangle(o_t, n), other=0)
    b_beta = load_beta(beta, t0, o_t, n, i_hv, HV, BETA_SIGMOID)
    b_daqk = tl.zeros([64, 64], dtype=tl.float32)
    b_da = tl.zeros([64, 64], dtype=tl.float32)
    b_db = tl.zeros([64], dtype=tl.float32)
    for vb in range(0, V, BV):
        o_v = vb + tl.arange(0, BV)
        m_tv = m_t[:, None] & (o_v < V)[None, :]
        p_tv = ((t0 + o_t[:, None]) * HV + i_hv) * V + o_v[None, :]
        b_dw = tl.load(dW + p_tv, mask=m_tv, other=0).to(tl.float32)
        if HALF_DOTS:
            b_do = tl.load(do + p_tv, mask=m_tv, other=0)
            b_w = tl.load(W + p_tv, mask=m_tv, other=0)
        else:
            b_do = tl.load(do + p_tv, mask=m_tv, other=0).to(tl.float32)
            b_w = tl.load(W + p_tv, mask=m_tv, other=0).to(tl.float32)
        b_daqk, b_da, b_db = _v_tile_grads(b_do, b_w, b_dw, b_M, b_beta, U, v, dv, p_tv, m_tv, b_daqk, b_da, b_db,
                                           PREC)
    tl.store(dA_part + p_part * 64 + p_cc, b_da, mask=m_t[:, None])
    tl.store(db_part + p_part + (t0 + o_t) * HV + i_hv, b_db, mask=m_t)
    tl.store(dAqk + p_cc, scale * tl.where(o_t[:, None] >= o_t[None, :], b_daqk, 0.0), mask=m_t[:, None])


@triton.jit
def _key_block_program(q, k, v, beta, G, M, U, Wk, W, h, dh, do, dW, dq, dk, dG, dGl, dv, dA_part, db_part, dAqk,
                       i_c, i_hv, i_h, i_kb, t0, n, o_t, scale, TOT,
                       H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr,
                       BV: tl.constexpr, BETA_SIGMOID: tl.constexpr, WITH_V: tl.constexpr, PREC: tl.constexpr,
                       HALF_DOTS: tl.constexpr):
    """The work of one key block of BK channels: the dense parts of dq / dk / dG and the Wk-parts of dA
    and dbeta (partial-sum slot ``p_part``). WITH_V: key block 0 also does the V-only work, its V tiles
    shared with the key-block products (otherwise ``_v_only_program`` does it). HALF_DOTS (without
    WITH_V; dO, W, dW, h and dh all in one half dtype): the V loop's three products take the stored
    tiles as they are -- the same exact products as tf32 on the widened values (a half value fits
    tf32's mantissa), fp32 sums, but no widened copies in registers and shared memory."""
    o_k = i_kb * BK + tl.arange(0, BK)
    m_t = o_t < n
    m_k = o_k < K
    m_tk = m_t[:, None] & m_k[None, :]
    first = i_kb == 0
    p_cc = ((t0 + o_t[:, None]) * HV + i_hv) * 64 + o_t[None, :]
    if WITH_V:
        b_M = tl.load(M + p_cc, mask=lower_triangle(o_t, n), other=0)
    b_beta = load_beta(beta, t0, o_t, n, i_hv, HV, BETA_SIGMOID)
    b_dqg = tl.zeros([64, BK], dtype=tl.float32)  # d(e^G q) / scale
    b_dkd = tl.zeros([64, BK], dtype=tl.float32)  # d(Kd)
    b_dwk = tl.zeros([64, BK], dtype=tl.float32)  # d(Wk)
    b_dgl = tl.zeros([BK], dtype=tl.float32)  # sum_v S * dS_next (the e^{G_last} S term)
    b_daqk = tl.zeros([64, 64], dtype=tl.float32)
    b_da = tl.zeros([64, 64], dtype=tl.float32)
    b_db = tl.zeros([64], dtype=tl.float32)
    p_h = (i_c.to(tl.int64) * HV + i_hv) * K * V
    for vb in range(0, V, BV):
        o_v = vb + tl.arange(0, BV)
        m_v = o_v < V
        m_tv = m_t[:, None] & m_v[None, :]
        m_kv = m_k[:, None] & m_v[None, :]
        p_tv = ((t0 + o_t[:, None]) * HV + i_hv) * V + o_v[None, :]
        if HALF_DOTS:
            b_do = tl.load(do + p_tv, mask=m_tv, other=0)
            b_w = tl.load(W + p_tv, mask=m_tv, other=0)
            b_dw = tl.load(dW + p_tv, mask=m_tv, other=0)
            b_h = tl.load(h + p_h + o_k[:, None] * V + o_v[None, :], mask=m_kv, other=0)
            b_dh = tl.load(dh + p_h + o_k[:, None] * V + o_v[None, :], mask=m_kv, other=0)
            b_dqg += tl.dot(b_do, tl.trans(b_h))
            b_dkd += tl.dot(b_w, tl.trans(b_dh))
            b_dwk -= tl.dot(b_dw, tl.trans(b_h))
            b_dgl += tl.sum(b_h.to(tl.float32) * b_dh.to(tl.float32), axis=1)
        else:
            b_do = tl.load(do + p_tv, mask=m_tv, other=0).to(tl.float32)
            b_w = tl.load(W + p_tv, mask=m_tv, other=0).to(tl.float32)
            b_dw = tl.load(dW + p_tv, mask=m_tv, other=0).to(tl.float32)
            b_h = tl.load(h + p_h + o_k[:, None] * V + o_v[None, :], mask=m_kv, other=0).to(tl.float32)
            b_dh = tl.load(dh + p_h + o_k[:, None] * V + o_v[None, :], mask=m_kv, other=0).to(tl.float32)
            b_dqg += tl.dot(b_do, tl.trans(b_h), input_precision=PREC)
            b_dkd += tl.dot(b_w, tl.trans(b_dh), input_precision=PREC)
            b_dwk -= tl.dot(b_dw, tl.trans(b_h), input_precision=PREC)
            b_dgl += tl.sum(b_h * b_dh, axis=1)
        if WITH_V:
            if first:
                b_daqk, b_da, b_db = _v_tile_grads(b_do, b_w, b_dw, b_M, b_beta, U, v, dv, p_tv, m_tv, b_daqk, b_da,
                                                   b_db, PREC)
    if not WITH_V:
        b_M = tl.load(M + p_cc, mask=lower_triangle(o_t, n), other=0)
    p_qk = ((t0 + o_t[:, None]) * H + i_h) * K + o_k[None, :]
    p_tk = ((t0 + o_t[:, None]) * HV + i_hv) * K + o_k[None, :]
    b_q = tl.load(q + p_qk, mask=m_tk, other=0).to(tl.float32)
    b_k = tl.load(k + p_qk, mask=m_tk, other=0).to(tl.float32)
    b_g = tl.load(G + p_tk, mask=m_tk, other=0)
    b_gl = tl.load(G + ((t0 + n - 1) * HV + i_hv) * K + o_k, mask=m_k, other=0)
    b_wk = tl.load(Wk + p_tk, mask=m_tk, other=0).to(tl.float32)
    b_eg = tl.where(m_tk, exp(b_g), 0.0)
    b_ed = tl.where(m_tk, exp(tl.minimum(b_gl[None, :] - b_g, 0.0)), 0.0)
    # Wk = M (beta e^G k)
    b_dxk = tl.dot(tl.trans(b_M), b_dwk, input_precision=PREC)
    b_da -= tl.dot(b_dxk, tl.trans(b_wk), input_precision=PREC)
    b_dq = scale * b_dqg * b_eg
    b_dG = scale * b_dqg * b_q * b_eg
    b_dk = b_dkd * b_ed
    b_t = b_dkd * b_k * b_ed
    b_dG -= b_t
    b_dgl = tl.sum(b_t, axis=0) + exp(b_gl) * b_dgl
    b_xk = b_k * b_eg
    b_dk += b_beta[:, None] * b_eg * b_dxk
    b_dG += b_beta[:, None] * b_dxk * b_xk
    b_db += tl.sum(b_dxk * b_xk, axis=1)
    p_part = i_kb.to(tl.int64) * TOT  # partial-sum slot of this key block
    tl.store(dA_part + p_part * 64 + p_cc, b_da, mask=m_t[:, None])
    tl.store(db_part + p_part + (t0 + o_t) * HV + i_hv, b_db, mask=m_t)
    tl.store(dq + p_tk, b_dq, mask=m_tk)
    tl.store(dk + p_tk, b_dk, mask=m_tk)
    tl.store(dG + p_tk, b_dG, mask=m_tk)
    tl.store(dGl + (i_c.to(tl.int64) * HV + i_hv) * K + o_k, b_dgl, mask=m_k)
    if WITH_V:
        if first:
            tl.store(dAqk + p_cc, scale * tl.where(o_t[:, None] >= o_t[None, :], b_daqk, 0.0), mask=m_t[:, None])


@triton.jit
def _chunk_grad_kernel(q, k, v, beta, G, M, U, Wk, W, h, dh, do, dW,
                       dq, dk, dG, dGl, dv, dA_part, db_part, dAqk, chunk_start, chunk_len, scale, TOT,
                       H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                       BK: tl.constexpr, BV: tl.constexpr, BETA_SIGMOID: tl.constexpr, PREC: tl.constexpr,
                       V_APART: tl.constexpr, HALF_DOTS: tl.constexpr, FULL: tl.constexpr = False):
    # One (chunk, value head, key block of BK channels); dA and dbeta leave as partial sums, one slot per
    # program. Key block 0 also does the V-only work (dv, dAqk and the U-parts of dA / dbeta) with the V
    # tiles it loads anyway; with V_APART that work is a program of its own (grid dimension 2 has one
    # more program, slot NKB), so no key-block program carries its accumulators or its loads.
    NKB: tl.constexpr = (K + BK - 1) // BK
    i_c = tl.program_id(0)
    i_hv = tl.program_id(1).to(tl.int64)
    i_kb = tl.program_id(2)
    i_h = i_hv // (HV // H)
    t0, n = chunk_place(chunk_start, chunk_len, i_c, FULL)
    o_t = tl.arange(0, 64)
    if V_APART:
        if i_kb == NKB:
            _v_only_program(v, beta, M, U, W, do, dW, dv, dA_part, db_part, dAqk, t0, n, i_hv, o_t,
                            i_kb.to(tl.int64) * TOT, scale, HV, V, BV, BETA_SIGMOID, PREC, HALF_DOTS)
        else:
            _key_block_program(q, k, v, beta, G, M, U, Wk, W, h, dh, do, dW, dq, dk, dG, dGl, dv, dA_part, db_part,
                               dAqk, i_c, i_hv, i_h, i_kb, t0, n, o_t, scale, TOT,
                               H, HV, K, V, BK, BV, BETA_SIGMOID, False, PREC, HALF_DOTS)
    else:
        _key_block_program(q, k, v, beta, G, M, U, Wk, W, h, dh, do, dW, dq, dk, dG, dGl, dv, dA_part, db_part, dAqk,
                           i_c, i_hv, i_h, i_kb, t0, n, o_t, scale, TOT,
                           H, HV, K, V, BK, BV, BETA_SIGMOID, True, PREC, False)


@triton.jit
def _chunk_grad_finish_kernel(beta, Araw, dA_part, db_part, dA, dbeta, chunk_start, chunk_len, TOT,
                              HV: tl.constexpr, NKB: tl.constexpr, BETA_SIGMOID: tl.constexpr,
                              FULL: tl.constexpr = False):
    # A = Diag(beta) Araw: dbeta += rowsum(dA * Araw); dAraw = Diag(beta) dA (strictly lower).
    i_c = tl.program_id(0)
    i_hv = tl.program_id(1).to(tl.int64)
    t0, n = chunk_place(chunk_start, chunk_len, i_c, FULL)
    o_t = tl.arange(0, 64)
    m_t = o_t < n
    p_cc = ((t0 + o_t[:, None]) * HV + i_hv) * 64 + o_t[None, :]
    p_b = (t0 + o_t) * HV + i_hv
    b_da = tl.zeros([64, 64], dtype=tl.float32)
    b_db = tl.zeros([64], dtype=tl.float32)
    for kb in range(0, NKB):
        b_da += tl.load(dA_part + kb * TOT * 64 + p_cc, mask=m_t[:, None], other=0)
        b_db += tl.load(db_part + kb * TOT + p_b, mask=m_t, other=0)
    b_beta = load_beta(beta, t0, o_t, n, i_hv, HV, BETA_SIGMOID)
    b_ar = tl.load(Araw + p_cc, mask=lower_triangle(o_t, n), other=0)
    b_da = tl.where((o_t[:, None] > o_t[None, :]) & m_t[:, None], b_da, 0.0)
    b_db += tl.sum(b_da * b_ar, axis=1)
    if BETA_SIGMOID:
        b_db = b_db * b_beta * (1.0 - b_beta)
    tl.store(dbeta + p_b, b_db.to(dbeta.dtype.element_ty), mask=m_t)
    tl.store(dA + p_cc, b_da * b_beta[:, None], mask=m_t[:, None])


@triton.jit
def tf32_nearest(x):
    """fp32 ``x`` rounded to the nearest tf32 value (10 mantissa bits; ties away from zero), kept in
    fp32. A tensor-core tf32 dot reads only the top 19 bits of each fp32 operand, i.e. truncates, so
    every product is biased toward zero by ~2^-11 on average; rounded operands leave an unbiased error
    of <= 2^-11. (In the decay products this halved the gate gradients' error; the rest was the
    decayed operand's rounding itself, see ``tf32split``.) Integer add then mask on the bits: a carry
    into the exponent is the correct round-up; canonical NaN and +-Inf map to themselves."""
    b = x.to(tl.int32, bitcast=True)
    return ((b + 0x1000) & -8192).to(tl.float32, bitcast=True)


@triton.jit
def _pdot(a, b, PREC: tl.constexpr):
    """``tl.dot(a, b)`` at ``PREC``: Triton's "tf32" / "tf32x3" / "ieee", "tf32rn" (one tf32 pass on
    operands rounded to nearest by :func:`tf32_nearest` instead of truncated) or "tf32split" (below)."""
    if PREC == "tf32rn":
        return tl.dot(tf32_nearest(a), tf32_nearest(b), input_precision="tf32")
    elif PREC == "tf32split":
        # two passes: b = hi + lo exactly (hi = b truncated to tf32; lo's own truncation is ~2^-21 of
        # b), a rounded to nearest. In the decay products b is the decayed q / k operand, whose
        # rounding is what moved the gate gradients (session 8, v12b: splitting a instead changed nothing)
        hi = (b.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)
        a_r = tf32_nearest(a)
        return tl.dot(a_r, hi, input_precision="tf32") + tl.dot(a_r, b - hi, input_precision="tf32")
    else:
        return tl.dot(a, b, input_precision=PREC)


# A sub-chunk whose chunk-relative gate sum G spans at most this much on every channel can take one
# reference for all its pairs: each factor e^{+-(G_t - G_p)} then lies in [e^-60, e^60], normal fp32
# numbers far inside the range (e^88) with room for |k| and the 16-term sums, so the factored products
# carry rounding error only, like the halving levels (which any gate may take).
FACTOR_SPAN = tl.constexpr(60.0)


@triton.jit
def _sub_chunk_span(b_g, m_r, m_k):
    """max over the program's channels of (max - min) of G over the sub-chunk's valid rows."""
    g_hi = tl.max(tl.where(m_r[:, None], b_g, -float("inf")), axis=0)
    g_lo = tl.min(tl.where(m_r[:, None], b_g, float("inf")), axis=0)
    return tl.max(tl.where(m_k, g_hi - g_lo, 0.0), axis=0)


@triton.jit
def _pair_products(pair, b_daq, b_da, b_q, b_k, f_t, f_j, b_dq2, b_dk3, b_dk4, b_dk5, PREC: tl.constexpr):
    """Add the diagonal sub-block's pairs (t, j) selected by ``pair [16, 16]`` whose decay factors as
    e^{G_t - G_j} = f_t[t] f_j[j] (``[16, BK]`` each): dq2, dk3 on rows t; dk4, dk5 on rows j."""
    l_aq = tl.where(pair, b_daq, 0.0)
    l_a = tl.where(pair, b_da, 0.0)
    b_kj = b_k * f_j
    b_dq2 += f_t * _pdot(l_aq, b_kj, PREC)
    b_dk3 += f_t * _pdot(l_a, b_kj, PREC)
    b_dk4 += f_j * _pdot(tl.trans(l_a), b_k * f_t, PREC)
    b_dk5 += f_j * _pdot(tl.trans(l_aq), b_q * f_t, PREC)
    return b_dq2, b_dk3, b_dk4, b_dk5


@triton.jit
def _diag_factored(b_g, b_q, b_k, b_daq, b_da, m_r, o_s, b_dq2, b_dk3, b_dk4, b_dk5, PREC: tl.constexpr,
                   MID: tl.constexpr):
    """The diagonal sub-block's pairs j < t through one reference value p of G per channel:
    e^{G_t - G_j} = f_up[t] f_dn[j], f_up = e^{G - G_p}, f_dn = e^{G_p - G}. MID False: p is the
    sub-chunk's top value (its first row: G does not increase), f_up <= 1 <= f_dn, taken when the span is
    <= FACTOR_SPAN; MID True: p is the midpoint of its range, both factors within e^{+-span/2}, taken when
    the span is <= 2 FACTOR_SPAN. Either way no factor leaves [e^-FACTOR_SPAN, e^FACTOR_SPAN], and each
    dot's rounding error is bounded by the sum of its true terms' sizes (the factors multiply back
    to e^{G_t - G_j} <= 1 term by term), as in the direct form. The clamps change no valid row; rows past
    the sequence's end (G loaded as 0) get finite factors and meet zero operands or masked stores."""
    g_hi = tl.max(tl.where(m_r[:, None], b_g, -float("inf")), axis=0)
    if MID:
        g_lo = tl.min(tl.where(m_r[:, None], b_g, float("inf")), axis=0)
        d = tl.minimum(tl.maximum(b_g - 0.5 * (g_hi + g_lo)[None, :], -FACTOR_SPAN), FACTOR_SPAN)
    else:
        d = tl.minimum(tl.maximum(b_g - g_hi[None, :], -FACTOR_SPAN), 0.0)
    f_up = exp(d)
    f_dn = exp(-d)
    return _pair_products(o_s[:, None] > o_s[None, :], b_daq, b_da, b_q, b_k, f_up, f_dn,
                          b_dq2, b_dk3, b_dk4, b_dk5, PREC)


@triton.jit
def _diag_level(s, G, t0, n, i_hv, a, o_k, m_k, o_s, b_g, b_q, b_k, b_daq, b_da, b_dq2, b_dk3, b_dk4, b_dk5,
                HV: tl.constexpr, K: tl.constexpr, PREC: tl.constexpr):
    """One halving level s (8, 4, 2 or 1) of :func:`_diag_levels`."""
    mid = (o_s // (2 * s)) * (2 * s) + s
    upper = (o_s & s) != 0
    b_gm = tl.load(G + ((t0 + a * 16 + mid[:, None]) * HV + i_hv) * K + o_k[None, :],
                   mask=((a * 16 + mid) < n)[:, None] & m_k[None, :], other=0)
    b_f = exp(tl.minimum(tl.where(upper[:, None], b_g - b_gm, b_gm - b_g), 0.0))
    f_up = tl.where(upper[:, None], b_f, 0.0)  # F of the upper rows t
    f_lo = b_f - f_up  # F of the lower rows j
    pair = ((o_s[:, None] // (2 * s)) == (o_s[None, :] // (2 * s))) & upper[:, None] & (~upper)[None, :]
    return _pair_products(pair, b_daq, b_da, b_q, b_k, f_up, f_lo, b_dq2, b_dk3, b_dk4, b_dk5, PREC)


@triton.jit
def _diag_levels(G, t0, n, i_hv, a, o_k, m_k, o_s, b_g, b_q, b_k, b_daq, b_da, b_dq2, b_dk3, b_dk4, b_dk5,
                 HV: tl.constexpr, K: tl.constexpr, PREC: tl.constexpr, ROLLED: tl.constexpr):
    """The diagonal sub-block's pairs j < t by halving levels, exact for any gate."""
    # Diagonal sub-block by halving levels: at level s = 8, 4, 2, 1 the pairs j < r of one 2s-aligned
    # group with r in its upper half and j in its lower half factor through the group's midpoint p
    # (j < p <= r): e^{G_r - G_j} = F_r F_j with F_r = e^{G_r - G_p} and F_j = e^{G_p - G_j}, both <= 1,
    # so nothing overflows for any gate, and a factor that underflows bounds a product below it (exact).
    # Every pair j < r has exactly one such level; a row takes one exponential per level and channel
    # (to its own group's midpoint), and the sums run as [16,16] x [16,BK] dots.
    # ROLLED: the four levels as a loop instead of unrolled (session 14: for sm_90a the default decay
    # kernel then needs 238 registers and no spills instead of 255 and 228 B; not yet timed)
    if ROLLED:
        for lvl in range(4):
            b_dq2, b_dk3, b_dk4, b_dk5 = _diag_level(8 >> lvl, G, t0, n, i_hv, a, o_k, m_k, o_s, b_g, b_q, b_k,
                                                     b_daq, b_da, b_dq2, b_dk3, b_dk4, b_dk5, HV, K, PREC)
    else:
        for lvl in tl.static_range(4):
            b_dq2, b_dk3, b_dk4, b_dk5 = _diag_level(8 >> lvl, G, t0, n, i_hv, a, o_k, m_k, o_s, b_g, b_q, b_k,
                                                     b_daq, b_da, b_dq2, b_dk3, b_dk4, b_dk5, HV, K, PREC)
    return b_dq2, b_dk3, b_dk4, b_dk5


@triton.jit
def _group_last(G, t0, n, i_hv, a, o_k, m_k, o_s, gs, HV: tl.constexpr, K: tl.constexpr):
    """G at the last valid row of each row's aligned group of ``gs`` rows ([16, BK], a gathered load of
    rows the program has just read)."""
    last = tl.minimum((o_s // gs) * gs + gs - 1, n - 1 - a * 16)
    return tl.load(G + ((t0 + a * 16 + last[:, None]) * HV + i_hv) * K + o_k[None, :], mask=m_k[None, :], other=0)


@triton.jit
def _group_span(G, t0, n, i_hv, a, o_k, m_k, o_s, m_rk, b_g, gs, HV: tl.constexpr, K: tl.constexpr):
    """max over the program's channels and the sub-chunk's aligned groups of ``gs`` rows of the group's
    gate span. G does not increase along a sequence (g <= 0), so a group's span is its first valid row's
    G minus its last's, and the max over a group's rows of G_r - G_last is that span."""
    b_gl = _group_last(G, t0, n, i_hv, a, o_k, m_k, o_s, gs, HV, K)
    return tl.max(tl.max(tl.where(m_rk, b_g - b_gl, 0.0), axis=1), axis=0)


@triton.jit
def _diag_tiered(G, t0, n, i_hv, a, o_k, m_k, o_s, m_rk, b_g, b_q, b_k, b_daq, b_da, b_dq2, b_dk3, b_dk4, b_dk5,
                 HV: tl.constexpr, K: tl.constexpr, PREC: tl.constexpr):
    """The diagonal sub-block's pairs j < t, exact for any gate: the fewest halving levels (8, 4, ...)
    after which every aligned group of the remaining size gs spans <= 2 FACTOR_SPAN on every channel,
    then the pairs inside each group through the group's midpoint per channel (both factors within
    [e^-FACTOR_SPAN, e^FACTOR_SPAN], as in ``_diag_factored``'s MID form). No level when the whole
    sub-chunk's span allows (the factored form); all four levels, and no group left, when not even
    2-row groups do. A sub-chunk too wide for one reference thus pays one level and one factored pass
    per halving instead of all four levels (the layer-fused benchmark's gates: 45% of the sub-chunks
    of a 32-channel block span <= 120, another 36% in both 8-row halves, the rest in 4-row groups)."""
    lim = 2 * FACTOR_SPAN
    n_lvl = 4
    if _group_span(G, t0, n, i_hv, a, o_k, m_k, o_s, m_rk, b_g, 16, HV, K) <= lim:
        n_lvl = 0
    elif _group_span(G, t0, n, i_hv, a, o_k, m_k, o_s, m_rk, b_g, 8, HV, K) <= lim:
        n_lvl = 1
    elif _group_span(G, t0, n, i_hv, a, o_k, m_k, o_s, m_rk, b_g, 4, HV, K) <= lim:
        n_lvl = 2
    elif _group_span(G, t0, n, i_hv, a, o_k, m_k, o_s, m_rk, b_g, 2, HV, K) <= lim:
        n_lvl = 3
    for lvl in range(n_lvl):
        b_dq2, b_dk3, b_dk4, b_dk5 = _diag_level(8 >> lvl, G, t0, n, i_hv, a, o_k, m_k, o_s, b_g, b_q, b_k,
                                                 b_daq, b_da, b_dq2, b_dk3, b_dk4, b_dk5, HV, K, PREC)
    gs = 16 >> n_lvl
    if gs > 1:
        first = (o_s // gs) * gs
        b_gf = tl.load(G + ((t0 + a * 16 + first[:, None]) * HV + i_hv) * K + o_k[None, :],
                       mask=((a * 16 + first) < n)[:, None] & m_k[None, :], other=0)
        b_gl = _group_last(G, t0, n, i_hv, a, o_k, m_k, o_s, gs, HV, K)
        # rows past the chunk's end get finite clamped factors and meet zero operands or masked stores
        d = tl.minimum(tl.maximum(b_g - 0.5 * (b_gf + b_gl), -FACTOR_SPAN), FACTOR_SPAN)
        pair = ((o_s[:, None] // gs) == (o_s[None, :] // gs)) & (o_s[:, None] > o_s[None, :])
        b_dq2, b_dk3, b_dk4, b_dk5 = _pair_products(pair, b_daq, b_da, b_q, b_k, exp(d), exp(-d),
                                                    b_dq2, b_dk3, b_dk4, b_dk5, PREC)
    return b_dq2, b_dk3, b_dk4, b_dk5


@triton.jit
def _decay_products(q, k, G, dA, dAqk, t0, n, i_hv, a, o_k, m_k, i_h,
                    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr,
                    FACTORED: tl.constexpr, ROLLED: tl.constexpr):
    """For the rows of sub-chunk a (exact, docs/kda.md step 3), with D[t,i] = e^{G_t - G_i}
    (FACTORED: the diagonal block's form, 0 = halving levels, 1 = factored through the sub-chunk's top
    where the span allows (<= 60), 2 = through its midpoint (span <= 120), else levels, 3 = tiered:
    levels until the groups left span <= 120, then each group through its midpoint):
    dq2 = sum_{i<=t} dAqk[t,i] k_i D,  dk3 = sum_{i<t} dA[t,i] k_i D  (rows t of a), and
    dk4 = sum_{t>i} dA[t,i] k_t D,  dk5 = sum_{t>=i} dAqk[t,i] q_t D  (rows i of a).
    Off-diagonal sub-blocks go through a reference token (tl.dot, one earlier or later sub-chunk at
    a time). The diagonal block goes by halving levels (below): 4 exponentials per (row, channel) and
    small tensor-core dots, 5.23 ms at 1M tokens x heads on an H100 against 6.90 for two 16-step loops
    of masked [16, BK] exponentials (sweep_v9_levels_h100.txt)."""
    o_s = tl.arange(0, 16)
    rows = a * 16 + o_s
    m_r = rows < n
    m_rk = m_r[:, None] & m_k[None, :]
    p_rows = ((t0 + rows) * HV + i_hv) * 64
    p_rows_cc = p_rows[:, None]
    b_g = tl.load(G + ((t0 + rows[:, None]) * HV + i_hv) * K + o_k[None, :], mask=m_rk, other=0)
    b_dq2 = tl.zeros([16, BK], dtype=tl.float32)
    b_dk3 = tl.zeros([16, BK], dtype=tl.float32)
    b_dk4 = tl.zeros([16, BK], dtype=tl.float32)
    b_dk5 = tl.zeros([16, BK], dtype=tl.float32)
    # off-diagonal sub-blocks, one 16-row sub-chunk b at a time ([16, BK] tiles keep registers low)
    # earlier sub-chunks b < a (columns i of dq2/dk3) through the reference token 16a
    b_gr = tl.load(G + ((t0 + a * 16) * HV + i_hv) * K + o_k, mask=m_k & (a * 16 < n), other=0)
    for b in range(0, a):
        cols = b * 16 + o_s
        p_ck = ((t0 + cols[:, None]) * H + i_h) * K + o_k[None, :]
        b_gp = tl.load(G + ((t0 + cols[:, None]) * HV + i_hv) * K + o_k[None, :], mask=m_k[None, :], other=0)
        b_x = tl.load(k + p_ck, mask=m_k[None, :], other=0).to(tl.float32) * exp(tl.minimum(b_gr[None, :] - b_gp, 0.0))
        m_pc = m_r[:, None]
        b_paq = tl.load(dAqk + p_rows_cc + cols[None, :], mask=m_pc, other=0)
        b_pa = tl.load(dA + p_rows_cc + cols[None, :], mask=m_pc, other=0)
        b_dq2 += _pdot(b_paq, b_x, PREC)
        b_dk3 += _pdot(b_pa, b_x, PREC)
    b_dec = exp(tl.minimum(b_g - b_gr[None, :], 0.0))
    b_dq2 = b_dq2 * b_dec
    b_dk3 = b_dk3 * b_dec
    # later sub-chunks b > a (rows t of dk4/dk5) through the reference token 16a+15 (or the last row)
    r_ref = tl.minimum(a * 16 + 15, n - 1)
    b_gr = tl.load(G + ((t0 + r_ref) * HV + i_hv) * K + o_k, mask=m_k, other=0)
    for b in range(a + 1, tl.cdiv(n, 16)):
        trow = b * 16 + o_s
        m_l = trow < n
        m_p = m_l[:, None] & m_k[None, :]
        b_gp = tl.load(G + ((t0 + trow[:, None]) * HV + i_hv) * K + o_k[None, :], mask=m_p, other=0)
        b_dec = exp(tl.minimum(b_gp - b_gr[None, :], 0.0))
        p_x = ((t0 + trow[:, None]) * H + i_h) * K + o_k[None, :]
        b_xk = tl.load(k + p_x, mask=m_p, other=0).to(tl.float32) * b_dec
        b_xq = tl.load(q + p_x, mask=m_p, other=0).to(tl.float32) * b_dec
        p_cols = ((t0 + trow[:, None]) * HV + i_hv) * 64 + a * 16 + o_s[None, :]
        b_pa = tl.load(dA + p_cols, mask=m_l[:, None], other=0)  # [t, i]
        b_paq = tl.load(dAqk + p_cols, mask=m_l[:, None], other=0)
        b_dk4 += _pdot(tl.trans(b_pa), b_xk, PREC)
        b_dk5 += _pdot(tl.trans(b_paq), b_xq, PREC)
    b_dec = exp(tl.minimum(b_gr[None, :] - b_g, 0.0))
    b_dk4 = b_dk4 * b_dec
    b_dk5 = b_dk5 * b_dec
    p_rk = ((t0 + rows[:, None]) * H + i_h) * K + o_k[None, :]
    b_q = tl.load(q + p_rk, mask=m_rk, other=0).to(tl.float32)
    b_k = tl.load(k + p_rk, mask=m_rk, other=0).to(tl.float32)
    b_daq = tl.load(dAqk + p_rows_cc + a * 16 + o_s[None, :], mask=m_r[:, None], other=0)  # [t, j]
    b_da = tl.load(dA + p_rows_cc + a * 16 + o_s[None, :], mask=m_r[:, None], other=0)
    eye = o_s[:, None] == o_s[None, :]
    # the j = t terms (decay e^0): dq2 and dk5 from dAqk[t, t], dk3 and dk4 from dA[t, t]
    c_q = tl.sum(tl.where(eye, b_daq, 0.0), axis=1)[:, None]
    c_a = tl.sum(tl.where(eye, b_da, 0.0), axis=1)[:, None]
    b_dq2 += c_q * b_k
    b_dk5 += c_q * b_q
    b_dk3 += c_a * b_k
    b_dk4 += c_a * b_k
    if FACTORED == 3:
        # the fewest halving levels that leave groups narrow enough for one reference each (_diag_tiered)
        b_dq2, b_dk3, b_dk4, b_dk5 = _diag_tiered(G, t0, n, i_hv, a, o_k, m_k, o_s, m_rk, b_g, b_q, b_k, b_daq,
                                                  b_da, b_dq2, b_dk3, b_dk4, b_dk5, HV, K, PREC)
    elif FACTORED > 0:
        # the whole sub-chunk through one reference where its gate span allows (exact there, see
        # _diag_factored; FACTORED 2 = the midpoint reference, twice the span); the halving levels
        # otherwise. The span is the same for every row of the program, so the branch is uniform.
        if _sub_chunk_span(b_g, m_r, m_k) <= FACTOR_SPAN * FACTORED:
            b_dq2, b_dk3, b_dk4, b_dk5 = _diag_factored(b_g, b_q, b_k, b_daq, b_da, m_r, o_s,
                                                        b_dq2, b_dk3, b_dk4, b_dk5, PREC, FACTORED == 2)
        else:
            b_dq2, b_dk3, b_dk4, b_dk5 = _diag_levels(G, t0, n, i_hv, a, o_k, m_k, o_s, b_g, b_q, b_k, b_daq, b_da,
                                                      b_dq2, b_dk3, b_dk4, b_dk5, HV, K, PREC, ROLLED)
    else:
        b_dq2, b_dk3, b_dk4, b_dk5 = _diag_levels(G, t0, n, i_hv, a, o_k, m_k, o_s, b_g, b_q, b_k, b_daq, b_da,
                                                  b_dq2, b_dk3, b_dk4, b_dk5, HV, K, PREC, ROLLED)
    return b_q, b_k, b_dq2, b_dk3, b_dk4, b_dk5


@triton.jit
def _decay_grad_kernel(q, k, G, dA, dAqk, dq, dk, dq_out, dk_out, dG, dGl, chunk_start, chunk_len,
                       H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr,
                       FACTORED: tl.constexpr, ROLLED: tl.constexpr, FULL: tl.constexpr = False):
    # One program per (16-row sub-chunk, value head, key block): the sub-chunks of a chunk are
    # independent here (4x the programs of a per-chunk loop, and no sub-chunk loop kept live in
    # registers: the per-chunk form used 255 registers and spilled). For the rows of the sub-chunk:
    # dq += sum_i dAqk[t,i] k_i e^{G_t-G_i};  dk += (dA row form) + (dA, dAqk column forms);
    # dG += q*dq2 + k*dk3 - k*dk4 - k*dk5 (+ the G_last terms on the chunk's last row).
    # The reverse cumsum dG -> dg runs afterwards in _gate_grad_kernel (it spans the sub-chunks).
    i_c = tl.program_id(0) // 4
    a = tl.program_id(0) % 4
    i_hv = tl.program_id(1).to(tl.int64)
    i_kb = tl.program_id(2)
    i_h = i_hv // (HV // H)
    t0, n = chunk_place(chunk_start, chunk_len, i_c, FULL)
    o_k = i_kb * BK + tl.arange(0, BK)
    m_k = o_k < K
    if a * 16 < n:  # a sub-chunk past the chunk's end has no rows (and earlier sub-chunks are full)
        rows = a * 16 + tl.arange(0, 16)
        m_r = rows < n
        m_rk = m_r[:, None] & m_k[None, :]
        p_tk = ((t0 + rows[:, None]) * HV + i_hv) * K + o_k[None, :]
        b_q, b_k, b_dq2, b_dk3, b_dk4, b_dk5 = _decay_products(q, k, G, dA, dAqk, t0, n, i_hv, a, o_k, m_k, i_h,
                                                               H, HV, K, BK, PREC, FACTORED, ROLLED)
        b_gl = tl.load(dGl + (i_c.to(tl.int64) * HV + i_hv) * K + o_k, mask=m_k, other=0)
        b_dq = tl.load(dq + p_tk, mask=m_rk, other=0).to(tl.float32) + b_dq2
        b_dk = tl.load(dk + p_tk, mask=m_rk, other=0).to(tl.float32) + b_dk3 + b_dk4 + b_dk5
        b_dG = tl.load(dG + p_tk, mask=m_rk, other=0) + b_q * b_dq2 + b_k * (b_dk3 - b_dk4 - b_dk5)
        b_dG += tl.where((rows == n - 1)[:, None], b_gl[None, :], 0.0)
        # dq_out / dk_out: dq / dk themselves, or the caller's final gradients in the input dtype
        tl.store(dq_out + p_tk, b_dq.to(dq_out.dtype.element_ty), mask=m_rk)
        tl.store(dk_out + p_tk, b_dk.to(dk_out.dtype.element_ty), mask=m_rk)
        tl.store(dG + p_tk, b_dG, mask=m_rk)


@triton.jit
def _gate_grad_kernel(dG, g, A_log, dt_bias, dg, dalog_part, ddtb_part, chunk_start, chunk_len,
                      HV: tl.constexpr, K: tl.constexpr, BK: tl.constexpr, NKB: tl.constexpr,
                      GATE_FROM_RAW: tl.constexpr, FLOOR: tl.constexpr, FULL: tl.constexpr = False):
    # G is the chunk's prefix sum of the gate, so dg = reverse cumsum of dG over the chunk's rows;
    # then the fused gate's backward: g = -e^{A_log} softplus(x + dt_bias) (zero below the floor).
    _gate_grad_tile(dG, g, A_log, dt_bias, dg, dalog_part, ddtb_part, chunk_start, chunk_len, tl.program_id(0),
                    tl.program_id(1).to(tl.int64), tl.program_id(2), HV, K, BK, NKB, GATE_FROM_RAW, FLOOR, FULL)


@triton.jit
def _gate_grad_tile(dG, g, A_log, dt_bias, dg, dalog_part, ddtb_part, chunk_start, chunk_len, i_c, i_hv, i_kb,
                    HV: tl.constexpr, K: tl.constexpr, BK: tl.constexpr, NKB: tl.constexpr,
                    GATE_FROM_RAW: tl.constexpr, FLOOR: tl.constexpr, FULL: tl.constexpr):
    """One (chunk, value head, key block) of :func:`_gate_grad_kernel`."""
    t0, n = chunk_place(chunk_start, chunk_len, i_c, FULL)
    o_t = tl.arange(0, 64)
    o_k = i_kb * BK + tl.arange(0, BK)
    m_k = o_k < K
    m_tk = (o_t < n)[:, None] & m_k[None, :]
    p_tk = ((t0 + o_t[:, None]) * HV + i_hv) * K + o_k[None, :]
    b_dg = tl.cumsum(tl.load(dG + p_tk, mask=m_tk, other=0), axis=0, reverse=True)
    b_graw = tl.load(g + p_tk, mask=m_tk, other=0).to(tl.float32)
    if GATE_FROM_RAW:
        b_alog = tl.load(A_log + i_hv).to(tl.float32)
        b_bias = tl.load(dt_bias + i_hv * K + o_k, mask=m_k, other=0).to(tl.float32)
        b_x = b_graw + b_bias[None, :]
        b_gate = -tl.exp(b_alog) * softplus_f32(b_x)
        b_dg = tl.where(m_tk & (b_gate >= FLOOR), b_dg, 0.0)
        b_dx = b_dg * (-tl.exp(b_alog)) * tl.sigmoid(b_x)
        tl.store(dg + p_tk, b_dx.to(dg.dtype.element_ty), mask=m_tk)
        p_part = (i_c.to(tl.int64) * HV + i_hv)
        tl.store(dalog_part + p_part * NKB + i_kb, tl.sum(tl.sum(b_dg * b_gate, axis=0), axis=0))
        tl.store(ddtb_part + p_part * K + o_k, tl.sum(b_dx, axis=0), mask=m_k)
    else:
        b_dg = tl.where(b_graw >= FLOOR, b_dg, 0.0)
        tl.store(dg + p_tk, b_dg.to(dg.dtype.element_ty), mask=m_tk)


@triton.jit
def _epilogue_kernel(dG, g, A_log, dt_bias, dg, dalog_part, ddtb_part, chunk_start, chunk_len,
                     ya, ra, dya, dxa, yb, rb, dyb, dxb, R, NGATE,
                     HV: tl.constexpr, K: tl.constexpr, BK: tl.constexpr, NKB: tl.constexpr,
                     GATE_FROM_RAW: tl.constexpr, FLOOR: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                     BR: tl.constexpr, FULL: tl.constexpr = False):
    # The gate gradients (the first NGATE programs: chunk, value head, key block) and the q / k l2norm
    # backward (the rest) in one launch: both read only what the decay products wrote (launch table
    # gate_grad merge_l2norm).
    pid = tl.program_id(0)
    if pid < NGATE:
        i_c, i_hv, i_kb = chunk_head_block(pid, HV, NKB)
        _gate_grad_tile(dG, g, A_log, dt_bias, dg, dalog_part, ddtb_part, chunk_start, chunk_len, i_c, i_hv, i_kb,
                        HV, K, BK, NKB, GATE_FROM_RAW, FLOOR, FULL)
    else:
        p = pid - NGATE
        nr = tl.cdiv(R, BR)
        _l2norm_bwd_rows(ya, ra, dya, dxa, yb, rb, dyb, dxb, R, p % nr, p // nr, D, DP, BR)


@triton.jit
def _gate_param_sum_kernel(dalog_part, ddtb_part, dA_log, ddt_bias, NC, HV: tl.constexpr, K: tl.constexpr,
                           KP: tl.constexpr, NKB: tl.constexpr, NKBP: tl.constexpr, BC: tl.constexpr):
    # dA_log[h] = sum over chunks and key blocks of dalog_part[c, h, :]; ddt_bias[h, :] = sum over chunks
    # of ddtb_part[c, h, :]. One program per value head, BC chunks per step (one launch for both sums).
    i_hv = tl.program_id(0).to(tl.int64)
    o_c = tl.arange(0, BC)
    o_k = tl.arange(0, KP)
    o_b = tl.arange(0, NKBP)
    acc_dt = tl.zeros([BC, KP], dtype=tl.float32)
    acc_a = tl.zeros([BC, NKBP], dtype=tl.float32)
    for c0 in range(0, NC, BC):
        rows = (c0 + o_c).to(tl.int64)
        m_c = rows < NC
        acc_dt += tl.load(ddtb_part + (rows[:, None] * HV + i_hv) * K + o_k[None, :],
                          mask=m_c[:, None] & (o_k < K)[None, :], other=0)
        acc_a += tl.load(dalog_part + (rows[:, None] * HV + i_hv) * NKB + o_b[None, :],
                         mask=m_c[:, None] & (o_b < NKB)[None, :], other=0)
    tl.store(ddt_bias + i_hv * K + o_k, tl.sum(acc_dt, axis=0), mask=o_k < K)
    tl.store(dA_log + i_hv, tl.sum(tl.sum(acc_a, axis=1), axis=0))


@triton.jit
def _l2norm_bwd_kernel(ya, ra, dya, dxa, yb, rb, dyb, dxb, R, D: tl.constexpr, DP: tl.constexpr, BR: tl.constexpr):
    # y = x r, r = (|x|^2 + eps)^-1/2:  dx = r (dy - y <y, dy>). Grid axis 1 picks the tensor (q, k).
    _l2norm_bwd_rows(ya, ra, dya, dxa, yb, rb, dyb, dxb, R, tl.program_id(0), tl.program_id(1), D, DP, BR)


@triton.jit
def _l2norm_bwd_rows(ya, ra, dya, dxa, yb, rb, dyb, dxb, R, i_r, i_x, D: tl.constexpr, DP: tl.constexpr,
                     BR: tl.constexpr):
    """Rows ``i_r * BR ...`` of tensor ``i_x`` (0: a, 1: b) of :func:`_l2norm_bwd_kernel`."""
    y, rstd, dy, dx = ya, ra, dya, dxa
    if i_x == 1:
        y, rstd, dy, dx = yb, rb, dyb, dxb
    o_r = i_r.to(tl.int64) * BR + tl.arange(0, BR)
    o_d = tl.arange(0, DP)
    m = (o_r < R)[:, None] & (o_d < D)[None, :]
    b_y = tl.load(y + o_r[:, None] * D + o_d[None, :], mask=m, other=0).to(tl.float32)
    b_dy = tl.load(dy + o_r[:, None] * D + o_d[None, :], mask=m, other=0).to(tl.float32)
    b_r = tl.load(rstd + o_r, mask=o_r < R, other=0)
    b_dx = b_r[:, None] * (b_dy - b_y * tl.sum(b_y * b_dy, axis=1)[:, None])
    tl.store(dx + o_r[:, None] * D + o_d[None, :], b_dx.to(dx.dtype.element_ty), mask=m)


def _l2norm_bwd_plan(terms):
    """Outputs and launch groups of :func:`l2norm_bwd`: ``(dxs, [(R, D, args) per launch])``; two terms of
    one shape and dtypes share a launch (args then hold both, else the one term twice)."""
    dxs = [chunk_common.alloc(y.shape, dt, y.device) for y, _, _, dt in terms]
    same = (len(terms) == 2 and same_shape_dtype(terms[0][0], terms[1][0])
            and same_shape_dtype(terms[0][2], terms[1][2]) and terms[0][3] == terms[1][3])
    launches = []
    for idx in ([[0, 1]] if same else [[i] for i in range(len(terms))]):
        y0, r0 = terms[idx[0]][0], terms[idx[0]][1]
        D, R = y0.shape[-1], r0.shape[0]
        flat = [(terms[i][0].reshape(-1, D), terms[i][1], terms[i][2].reshape(-1, D).contiguous(), dxs[i].view(-1, D))
                for i in idx]
        launches.append((R, D, len(idx), (*flat[0], *flat[-1])))
    return dxs, launches


def l2norm_bwd(*terms: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.dtype]) -> list[torch.Tensor]:
    """Gradients of :func:`chunk_fwd.l2norm_fwd`, one per ``(y, rstd, dy, out_dtype)`` (its output ``y``
    and ``rstd``, the upstream ``dy``); two terms of one shape and dtypes in one launch (q and k)."""
    dxs, launches = _l2norm_bwd_plan(terms)
    _launch_l2norm_bwd(launches)
    return dxs


def _launch_l2norm_bwd(launches) -> None:
    """The launches of an :func:`_l2norm_bwd_plan`."""
    for R, D, n, args in launches:
        if R > 0:
            _l2norm_bwd_kernel[(triton.cdiv(R, L2NORM_ROWS), n)](*args, R, D=D, DP=pow2(D), BR=L2NORM_ROWS)


def decay_precision(prec: str) -> str:
    """Dot precision of the decay products for half inputs (fp32 inputs keep their 3-pass ``prec``):
    ``LAUNCH["decay_grad"]["precise"]`` 0 = one truncating tf32 pass, 1 = 3-pass tf32, 2 = one pass on
    operands rounded to nearest ("tf32rn"), 4 = two passes with the decayed operand split exactly
    ("tf32split", the default). (3, the other operand split, measured no better than 2: removed.)"""
    mode = int(LAUNCH["decay_grad"].get("precise") or 0)
    if mode == 1:
        return "tf32x3"
    if prec == "tf32" and mode in (2, 4):
        return {2: "tf32rn", 4: "tf32split"}[mode]
    return prec


def chunk_kda_bwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
    saved: dict[str, torch.Tensor], do: torch.Tensor, dht: torch.Tensor | None, *, scale: float,
    has_initial_state: bool, table: ChunkTable, A_log: torch.Tensor | None, dt_bias: torch.Tensor | None,
    beta_sigmoid: bool, grad_dtype: torch.dtype = torch.float32,
    l2norm: tuple[torch.Tensor, torch.Tensor, torch.dtype, torch.dtype] | None = None,
) -> tuple[torch.Tensor, ...]:
    """Backward over a packed stream (inputs as for ``chunk_kda_fwd``; ``do [Ttot, HV, V]``).

    Returns ``dq, dk`` per value head ``[Ttot, HV, K]`` in ``grad_dtype`` (fp32 when GVA groups still
    sum or, unless the launch table's l2norm half_dy, the norm's backward follows; the input dtype saves
    a cast otherwise), ``dv``,
    ``dg`` (of the raw gate when fused), ``dbeta`` (of the logits when fused), ``dh0`` (or None),
    ``dA_log``, ``ddt_bias`` (None unless the gate is fused). ``l2norm = (rq, rk, q_dtype, k_dtype)``
    (HV == H only; q and k are then the normalised ones): dq, dk are returned through the norm's
    backward, in those dtypes.
    """
    Ttot, H, K = q.shape
    HV, V = v.shape[1], v.shape[2]
    dev = q.device
    KP = pow2(K)
    cg = LAUNCH["chunk_grad"]
    v_apart = bool(cg.get("v_apart"))
    # V tile of the chunk-gradient kernel: 64 where it fits (K <= 64; with v_apart its pipelined tiles
    # take 123-147 KB of shared memory at K = 128 for sm_90a, which an H100 has), else 32
    wide = K <= 64 or (v_apart and chunk_common.max_shared_memory(dev) >= 160 * 1024)
    BV = min(int(cg.get("BV") or (64 if wide else 32)), pow2(V))
    BVS, scan_kw = scan_launch("state_bwd", table.N * HV, V, KP, v.dtype, dev)
    BK = min(int(LAUNCH["decay_grad"].get("BK") or 32), KP)  # key block of the decay products
    NKB = triton.cdiv(K, BK)
    prec = dot_precision(v.dtype)
    NC, N = table.NC, table.N
    cs, cl, cf = table.chunk_start, table.chunk_len, table.chunk_first
    do = do.contiguous()
    dh = chunk_common.alloc((max(NC, 1), HV, K, V), saved["h"].dtype, dev)
    dW = chunk_common.alloc((Ttot, HV, V), chunk_common.stored_dtype("dw", v.dtype), dev)
    dh0 = chunk_common.alloc((N, HV, K, V), torch.float32, dev) if has_initial_state else None
    # dw_local=1: the scan's dO-only term as a parallel kernel first (launch-table variant, see LAUNCH)
    dw_local = bool(LAUNCH["state_bwd"].get("dw_local")) and NC > 0
    # every chunk full and the launch table's chunks bwd: the per-chunk kernels place chunks from their index
    full = table.full and bool(LAUNCH["chunks"].get("bwd"))
    if dw_local:
        BVD = min(64, pow2(V))
        _dw_local_kernel[(NC, HV, triton.cdiv(V, BVD))](saved["Aqk"], do, dW, cs, cl, scale, HV=HV, V=V, BV=BVD,
                                                        PREC=prec, FULL=full, **launch("dw_local"))
    if N > 0:
        _state_bwd_kernel[(triton.cdiv(V, BVS), N * HV)](
            saved["Qg"], saved["Kd"], saved["G"], saved["Aqk"], saved["Wk"], do, dht if dht is not None else dW, dh, dW,
            dh0 if dh0 is not None else dW, table.seq_start, cf, scale, HV=HV, K=K, V=V, KP=KP, BV=BVS,
            HAS_DHT=dht is not None, STORE_DH0=dh0 is not None, PREC=prec, DW_LOCAL=dw_local, **scan_kw)
    # the chunk-gradient kernel's parts of dq / dk, which the decay products complete (bf16 with
    # half_store dqk)
    dqk_dtype = chunk_common.stored_dtype("dqk", v.dtype)
    dq = chunk_common.alloc((Ttot, HV, K), dqk_dtype, dev)
    dk = chunk_common.alloc((Ttot, HV, K), dqk_dtype, dev)
    dG = chunk_common.alloc((Ttot, HV, K), torch.float32, dev)
    dGl = chunk_common.alloc((max(NC, 1), HV, K), torch.float32, dev)
    dv = chunk_common.alloc(v.shape, v.dtype, dev)
    dbeta = chunk_common.alloc(beta.shape, beta.dtype, dev)
    dA = chunk_common.alloc((Ttot, HV, 64), torch.float32, dev)
    dAqk = chunk_common.alloc((Ttot, HV, 64), torch.float32, dev)
    dg = chunk_common.alloc(g.shape, g.dtype, dev)
    gate_raw = A_log is not None
    BKG = min(int(cg.get("BK") or 64), KP)  # key block of the chunk-gradient kernel
    NKG = triton.cdiv(K, BKG)
    BKE = min(32, KP)  # key block of the gate-gradient kernel
    NKE = triton.cdiv(K, BKE)
    dalog_part = chunk_common.alloc((max(NC, 1), HV, NKE), torch.float32, dev) if gate_raw else dGl
    ddtb_part = chunk_common.alloc((max(NC, 1), HV, K), torch.float32, dev) if gate_raw else dGl
    dq_out, dk_out = dq, dk  # the last writer of dq / dk (the decay products) stores them here
    if grad_dtype != dqk_dtype:
        dq_out = chunk_common.alloc((Ttot, HV, K), grad_dtype, dev)
        dk_out = chunk_common.alloc((Ttot, HV, K), grad_dtype, dev)
    if NC > 0:
        # half_dots: the V loop's products on the stored tiles, where they share one half dtype
        half_dots = (v_apart and bool(cg.get("half_dots")) and do.dtype in (torch.bfloat16, torch.float16)
                     and all(t.dtype == do.dtype for t in (saved["W"], dW, saved["h"], dh)))
        n_part = NKG + v_apart  # dA / dbeta partial-sum slots: one per chunk-gradient program of a chunk
        dA_part = chunk_common.alloc((n_part, Ttot, HV, 64), torch.float32, dev)
        db_part = chunk_common.alloc((n_part, Ttot, HV), torch.float32, dev)
        _chunk_grad_kernel[(NC, HV, n_part)](
            q, k, v, beta, saved["G"], saved["M"], saved["U"], saved["Wk"], saved["W"],
            saved["h"], dh, do, dW, dq, dk, dG, dGl, dv, dA_part, db_part, dAqk, cs, cl, scale, Ttot * HV,
            H=H, HV=HV, K=K, V=V, BK=BKG, BV=BV, BETA_SIGMOID=beta_sigmoid, PREC=prec, V_APART=v_apart,
            HALF_DOTS=half_dots, FULL=full,
            **launch("chunk_grad", tile=(BKG, BV)))
        _chunk_grad_finish_kernel[(NC, HV)](beta, saved["Araw"], dA_part, db_part, dA, dbeta, cs, cl, Ttot * HV,
                                            HV=HV, NKB=n_part, BETA_SIGMOID=beta_sigmoid, FULL=full,
                                            **launch("grad_finish"))
        _decay_grad_kernel[(NC * 4, HV, NKB)](
            q, k, saved["G"], dA, dAqk, dq, dk, dq_out, dk_out, dG, dGl, cs, cl, H=H, HV=HV, K=K, BK=BK,
            PREC=decay_precision(prec), FACTORED=int(LAUNCH["decay_grad"].get("factored") or 0),
            ROLLED=bool(LAUNCH["decay_grad"].get("rolled")), FULL=full,
            **launch("decay_grad"))
    norm_plan = None
    if l2norm is not None:
        rq, rk, q_dtype, k_dtype = l2norm
        norm_plan = _l2norm_bwd_plan(((q, rq, dq_out, q_dtype), (k, rk, dk_out, k_dtype)))
    if NC > 0:
        gate_args = (dG, g, A_log if gate_raw else dGl, dt_bias if gate_raw else dGl, dg, dalog_part, ddtb_part, cs, cl)
        gate_flags = dict(HV=HV, K=K, BK=BKE, NKB=NKE, GATE_FROM_RAW=gate_raw, FLOOR=GATE_FLOOR, FULL=full)
        if norm_plan is not None and len(norm_plan[1]) == 1 and LAUNCH["gate_grad"].get("merge_l2norm"):
            # the gate gradients and the q / k norm's backward in one launch
            R, D, _, norm_args = norm_plan[1][0]
            ngate = NC * HV * NKE
            _epilogue_kernel[(ngate + 2 * triton.cdiv(R, L2NORM_ROWS),)](
                *gate_args, *norm_args, R, ngate, D=D, DP=pow2(D), BR=L2NORM_ROWS, **gate_flags, **launch("gate_grad"))
            norm_plan = (norm_plan[0], [])
        else:
            _gate_grad_kernel[(NC, HV, NKE)](*gate_args, **gate_flags, **launch("gate_grad"))
    if norm_plan is not None:
        _launch_l2norm_bwd(norm_plan[1])
        dq_out, dk_out = norm_plan[0]
    dA_log = ddt_bias = None
    if gate_raw:
        if NC > 0:
            dA_log = chunk_common.alloc((HV,), torch.float32, dev)
            ddt_bias = chunk_common.alloc((HV * K,), torch.float32, dev)
            _gate_param_sum_kernel[(HV,)](dalog_part, ddtb_part, dA_log, ddt_bias, NC, HV=HV, K=K, KP=KP, NKB=NKE,
                                          NKBP=pow2(NKE), BC=16, num_warps=4)
        else:
            dA_log = torch.zeros(HV, dtype=torch.float32, device=dev)
            ddt_bias = torch.zeros(HV * K, dtype=torch.float32, device=dev)
    return dq_out, dk_out, dv, dg, dbeta, dh0, dA_log, ddt_bias
