"""The whole per-chunk gram of chunked KDA in one launch, by halving levels over the chunk (Triton).

Step 3 of docs/kda.md needs, for every chunk and value head, the strictly-lower ``Araw[t, i] =
sum_c k_t k_i e^{G_t - G_i}`` and the lower ``Aqk[t, i] = sum_c q_t k_i e^{G_t - G_i}`` (``i <= t``).
The default forward makes them in two launches: the off-diagonal 16x16 blocks as dots through a
reference token per sub-chunk (``_gram_kernel``), the diagonal blocks token-parallel with one
exponential per (pair, channel) (``_gram_diag_kernel``, 1.01 ms of the forward's 4.30 at B8 T4K H32).

Here every pair ``i < t`` of the 64-token chunk is placed in exactly one *level* ``s`` in
{32, 16, 8, 4, 2, 1}: the one where ``t`` and ``i`` share a 2s-aligned group of rows, ``t`` in its
upper half and ``i`` in its lower half. Through the group's midpoint ``p = 2s * group + s``
(``i < p <= t``) the decay factors as ``e^{G_t - G_p} e^{G_p - G_i}``, both factors <= 1 because
``G`` is a running sum of gates <= 0, so nothing overflows for any gate and a factor that underflows
bounds a true product that is smaller still. A level's 32 upper rows and 32 lower rows (gathered
from the chunk) give one ``[32, K] x [K, 32]`` dot per matrix, masked to the pairs of one group.
Each row takes one exponential per level and channel (6, against ~2 + 8.5 in the two default
kernels), every sum runs on tensor cores, and a chunk's work is one program (or ``SPLIT`` adjacent
programs, which share the chunk's rows in L2). The diagonal ``Aqk[t, t] = q_t . k_t`` (no decay)
and ``Araw[t, t] = 0`` come from the first program of a chunk.

Launch table entry ``gram_levels`` (``on=1`` selects it; docs/kernels.md v16).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kimi_linear.ops.kda.chunk_common import launch, pow2

LEVELS = 6  # halving levels of a 64-token chunk: s = 32, 16, 8, 4, 2, 1


@triton.jit
def _level_pairs(q, k, G, Araw, Aqk, t0, n, i_hv, i_h, S: tl.constexpr,
                 H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, KP: tl.constexpr, BK: tl.constexpr,
                 PREC: tl.constexpr, GUARD: tl.constexpr, HALF: tl.constexpr):
    """Level ``S``: the pairs (upper-half row, lower-half row) of every 2S-aligned group of the chunk."""
    o_p = tl.arange(0, 32)
    grp = o_p // S
    up = grp * 2 * S + S + o_p % S  # [32] chunk rows in upper halves
    low = grp * 2 * S + o_p % S  # [32] the lower-half rows, same positions
    ref = grp * 2 * S + S  # each row's group midpoint (the same for up[p] and low[p])
    # rows past the chunk's end read row n - 1 instead: no row mask, and every exponent below stays
    # <= 0 (min(ref, n-1) >= min(low, n-1) and min(up, n-1) >= min(ref, n-1)); their pairs are not stored
    last = n - 1
    r_up = tl.minimum(up, last)
    r_low = tl.minimum(low, last)
    r_ref = tl.minimum(ref, last)
    b_aq = tl.zeros([32, 32], dtype=tl.float32)
    b_ak = tl.zeros([32, 32], dtype=tl.float32)
    p_qk_up = ((t0 + r_up[:, None]) * H + i_h) * K
    p_qk_low = ((t0 + r_low[:, None]) * H + i_h) * K
    p_g_up = ((t0 + r_up[:, None]) * HV + i_hv) * K
    p_g_low = ((t0 + r_low[:, None]) * HV + i_hv) * K
    p_g_ref = ((t0 + r_ref[:, None]) * HV + i_hv) * K
    for kb in range(0, KP // BK):
        o_k = kb * BK + tl.arange(0, BK)
        m_k = (o_k < K)[None, :]
        b_qu = tl.load(q + p_qk_up + o_k[None, :], mask=m_k, other=0).to(tl.float32)
        b_ku = tl.load(k + p_qk_up + o_k[None, :], mask=m_k, other=0).to(tl.float32)
        b_kl = tl.load(k + p_qk_low + o_k[None, :], mask=m_k, other=0).to(tl.float32)
        b_gu = tl.load(G + p_g_up + o_k[None, :], mask=m_k, other=0)
        b_gl = tl.load(G + p_g_low + o_k[None, :], mask=m_k, other=0)
        b_gr = tl.load(G + p_g_ref + o_k[None, :], mask=m_k, other=0)
        # G_up - G_ref and G_ref - G_low are <= 0 up to G's rounding (a parallel prefix sum need not be
        # monotone by an ulp); GUARD clamps that to 0
        d_up = b_gu - b_gr
        d_low = b_gr - b_gl
        if GUARD:
            d_up = tl.minimum(d_up, 0.0)
            d_low = tl.minimum(d_low, 0.0)
        e_up = tl.exp(d_up)
        b_kl = b_kl * tl.exp(d_low)
        if HALF:
            # the decayed operands rounded to the input dtype (bf16: 2^-9 relative against single-pass
            # tf32's 2^-11): twice the tensor-core rate, half the shared memory per operand
            DT: tl.constexpr = k.dtype.element_ty
            b_kl = b_kl.to(DT)
            b_aq += tl.dot((b_qu * e_up).to(DT), tl.trans(b_kl))
            b_ak += tl.dot((b_ku * e_up).to(DT), tl.trans(b_kl))
        else:
            b_aq += tl.dot(b_qu * e_up, tl.trans(b_kl), input_precision=PREC)
            b_ak += tl.dot(b_ku * e_up, tl.trans(b_kl), input_precision=PREC)
    # pairs of one group only (low < up there); rows past the chunk's end are not stored
    m = (grp[:, None] == grp[None, :]) & (up < n)[:, None]
    p_out = ((t0 + up[:, None]) * HV + i_hv) * 64 + low[None, :]
    tl.store(Aqk + p_out, b_aq, mask=m)
    tl.store(Araw + p_out, b_ak, mask=m)


@triton.jit
def _gram_levels_kernel(q, k, G, Araw, Aqk, chunk_start, chunk_len,
                        H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, KP: tl.constexpr,
                        BK: tl.constexpr, SPLIT: tl.constexpr, PREC: tl.constexpr, GUARD: tl.constexpr,
                        HALF: tl.constexpr):
    # one program per (chunk, value head, z < SPLIT): program z takes levels z, z + SPLIT, ...; the
    # SPLIT programs of a chunk are adjacent in launch order (the chunk's rows are L2 hits for the rest)
    i_c = tl.program_id(0) // SPLIT
    z = tl.program_id(0) % SPLIT
    i_hv = tl.program_id(1).to(tl.int64)
    i_h = i_hv // (HV // H)
    t0 = tl.load(chunk_start + i_c).to(tl.int64)
    n = tl.load(chunk_len + i_c)
    for lv in tl.static_range(6):  # LEVELS (a plain global is not visible to a compiled kernel)
        if lv % SPLIT == z:
            _level_pairs(q, k, G, Araw, Aqk, t0, n, i_hv, i_h, 32 >> lv, H, HV, K, KP, BK, PREC, GUARD, HALF)
    if z == 0:
        # the diagonal: Aqk[t, t] = q_t . k_t (decay e^0), Araw[t, t] = 0 (strictly lower)
        o_t = tl.arange(0, 64)
        m_t = o_t < n
        b_d = tl.zeros([64], dtype=tl.float32)
        for kb in range(0, KP // BK):
            o_k = kb * BK + tl.arange(0, BK)
            m_tk = m_t[:, None] & (o_k < K)[None, :]
            p_qk = ((t0 + o_t[:, None]) * H + i_h) * K + o_k[None, :]
            b_q = tl.load(q + p_qk, mask=m_tk, other=0).to(tl.float32)
            b_k = tl.load(k + p_qk, mask=m_tk, other=0).to(tl.float32)
            b_d += tl.sum(b_q * b_k, axis=1)
        p_diag = ((t0 + o_t) * HV + i_hv) * 64 + o_t
        tl.store(Aqk + p_diag, b_d, mask=m_t)
        tl.store(Araw + p_diag, tl.zeros([64], dtype=tl.float32), mask=m_t)


def gram_levels(q, k, G, Araw, Aqk, table, *, prec: str, cfg: dict) -> None:
    """Fill the lower triangles of ``Araw`` / ``Aqk`` ``[Ttot, HV, 64]`` (fp32) from ``q, k [Ttot, H, K]``
    and the chunk-cumulated gate ``G [Ttot, HV, K]`` (fp32). ``cfg``: the ``gram_levels`` launch-table
    entry (``BK`` key block, ``split`` programs per chunk and value head: 1, 2, 3 or 6, ``guard``; ``half``:
    the dots on operands rounded to half inputs' dtype)."""
    _, H, K = q.shape
    HV = G.shape[1]
    KP = pow2(K)
    BK = min(int(cfg.get("BK") or 32), KP)
    split = int(cfg.get("split") or 1)
    if LEVELS % split:
        raise ValueError(f"gram_levels split must divide {LEVELS} (1, 2, 3 or 6), got {split}")
    _gram_levels_kernel[(table.NC * split, HV)](
        q, k, G, Araw, Aqk, table.chunk_start, table.chunk_len, H=H, HV=HV, K=K, KP=KP, BK=BK, SPLIT=split,
        PREC=prec, GUARD=bool(cfg.get("guard", 1)), HALF=bool(cfg.get("half")) and q.dtype != torch.float32,
        **launch("gram_levels"))
