"""Triton forward of chunked KDA (imported lazily: needs Triton). Steps cite docs/kda.md.

Stages (one launch each; shapes for the packed stream of ``Ttot`` tokens, NC chunks):

| stage            | grid              | reads                      | writes                               |
|------------------|-------------------|----------------------------|--------------------------------------|
| gate + cumsum    | (NC, HV, K/BK)    | g (raw or log-decay)       | G [Ttot, HV, K] fp32 (step 2)        |
| q/k norm         | rows              | q, k                       | normalised q, k; or, in a forward no backward follows, only rq, rk [H, Ttot] (the readers scale rows on load; in the gate's launch) |
| gram (diagonal)  | (NC*64, HV/BH)    | q, k, G                    | the 16x16 diagonal blocks of Araw, Aqk [Ttot, HV, 64] fp32 (step 3) |
| gram + inverse   | (NC, HV)          | q, k, G, beta, Araw's diagonal blocks | Aqk's off-diagonal blocks; M = (I + Diag(beta) Araw)^-1 (steps 3-4); Araw's off-diagonal blocks only where a backward follows |
| (two-launch form: gram (off-diag.) (NC*4, HV) writing Araw, Aqk, then inverse (NC, HV); launch table gram_solve on=0) | | | |
| solve: products  | (NC*K/BV, HV)     | M, beta, q, k, v, G        | U, Wk, Qg, Kd (steps 4, 5, 7)        |
| state scan       | (V/BV, N*HV)      | U, Wk, Kd, G_last (+Qg, Aqk)| h [NC, HV, K, V], W, final state (6-7); o where the scan is wide |
| output           | (NC*V/64, HV)     | Qg, h, Aqk, W              | o (step 5), unless the scan wrote it |

Only the lower triangle (diagonal included) of the per-chunk [64, 64] matrices Araw, Aqk and M is
stored; every reader masks with ``lower_triangle``. Programs that share a chunk's tiles are adjacent
in launch order (the fastest grid axis), so their shared reads hit L2.

Exactness (step 3): every ``exp`` argument is <= 0. Off-diagonal 16x16 sub-blocks factor the decay
through a reference token between the two sub-chunks (two factors <= 1, so a tl.dot); diagonal
sub-blocks use the elementwise pairwise decay with the mask applied before ``exp``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kimi_linear.ops.kda import chunk_common
from kimi_linear.ops.kda.chunk_common import GATE_FLOOR, LAUNCH, ChunkTable, launch, pow2, scan_launch
from kimi_linear.ops.kda.fast_exp import exp_g


@triton.jit
def softplus_f32(x):
    """torch's softplus (identity above 20) without overflow; log1p by its series where exp(-|x|) is
    tiny, since log(1 + z) rounds to 0 there in fp32."""
    z = tl.exp(-tl.abs(x))
    l1p = tl.where(z < 1e-4, z * (1.0 - 0.5 * z), tl.log(1.0 + z))
    return tl.where(x > 20.0, x, tl.maximum(x, 0.0) + l1p)


@triton.jit
def chunk_place(chunk_start, chunk_len, i_c, FULL: tl.constexpr):
    """Chunk ``i_c``'s first token (int64) and length: from the chunk table, or, when every chunk is full
    and in order (``ChunkTable.full``), from ``i_c`` alone -- no dependent load before the program's own."""
    if FULL:
        return i_c.to(tl.int64) * 64, 64
    else:
        return tl.load(chunk_start + i_c).to(tl.int64), tl.load(chunk_len + i_c)


@triton.jit
def _gate_cumsum_kernel(g, G, A_log, dt_bias, chunk_start, chunk_len,
                        HV: tl.constexpr, K: tl.constexpr, BK: tl.constexpr,
                        GATE_FROM_RAW: tl.constexpr, FLOOR: tl.constexpr, BASE2: tl.constexpr = False,
                        FULL: tl.constexpr = False):
    # Step 0 (fused gate) + step 2: G_t = sum_{j<=t} max(g_j, FLOOR) inside the chunk, fp32, one
    # program per (chunk, value head, key block of BK): memory-bound, so small tiles and many programs
    # (the whole-K [64, 128] tile held 144 registers, 19% occupancy, 75% of DRAM bandwidth).
    _gate_cumsum_tile(g, G, A_log, dt_bias, chunk_start, chunk_len, tl.program_id(0), tl.program_id(1).to(tl.int64),
                      tl.program_id(2), HV, K, BK, GATE_FROM_RAW, FLOOR, BASE2, FULL)


@triton.jit
def _gate_cumsum_tile(g, G, A_log, dt_bias, chunk_start, chunk_len, i_c, i_hv, i_kb,
                      HV: tl.constexpr, K: tl.constexpr, BK: tl.constexpr,
                      GATE_FROM_RAW: tl.constexpr, FLOOR: tl.constexpr, BASE2: tl.constexpr, FULL: tl.constexpr):
    """One (chunk, value head, key block) of :func:`_gate_cumsum_kernel`. ``BASE2``: G in units of
    log2 (``G log2(e)``), for readers that take ``2^x`` of its differences (:func:`fast_exp.exp_g`)."""
    t0, n = chunk_place(chunk_start, chunk_len, i_c, FULL)
    o_t = tl.arange(0, 64)
    o_k = i_kb * BK + tl.arange(0, BK)
    m = (o_t[:, None] < n) & (o_k[None, :] < K)
    off = ((t0 + o_t[:, None]) * HV + i_hv) * K + o_k[None, :]
    b_g = tl.load(g + off, mask=m, other=0).to(tl.float32)
    if GATE_FROM_RAW:
        b_a = tl.load(A_log + i_hv).to(tl.float32)
        b_b = tl.load(dt_bias + i_hv * K + o_k, mask=o_k < K, other=0).to(tl.float32)
        b_g = -tl.exp(b_a) * softplus_f32(b_g + b_b[None, :])
    b_g = tl.where(m, tl.maximum(b_g, FLOOR), 0.0)
    if BASE2:
        b_g = b_g * 1.4426950408889634
    tl.store(G + off, tl.cumsum(b_g, axis=0), mask=m)


@triton.jit
def chunk_head_block(pid, HV: tl.constexpr, NKB: tl.constexpr):
    """(chunk, value head (int64), key block) of program ``pid`` of a flattened (NC, HV, NKB) grid, key
    block fastest: the per-chunk part of a launch that also does other work."""
    return pid // (NKB * HV), ((pid // NKB) % HV).to(tl.int64), pid % NKB


@triton.jit
def _gate_cumsum_program(g, G, A_log, dt_bias, chunk_start, chunk_len, pid, HV: tl.constexpr, K: tl.constexpr,
                         BK: tl.constexpr, NKB: tl.constexpr, GATE_FROM_RAW: tl.constexpr, FLOOR: tl.constexpr,
                         BASE2: tl.constexpr, FULL: tl.constexpr):
    """Program ``pid`` (< NC * HV * NKB) of a merged prologue launch as one tile of the gate's cumsum."""
    i_c, i_hv, i_kb = chunk_head_block(pid, HV, NKB)
    _gate_cumsum_tile(g, G, A_log, dt_bias, chunk_start, chunk_len, i_c, i_hv, i_kb,
                      HV, K, BK, GATE_FROM_RAW, FLOOR, BASE2, FULL)


@triton.jit
def _prologue_kernel(g, G, A_log, dt_bias, chunk_start, chunk_len, xa, ya, ra, xb, yb, rb, R, NGATE,
                     HV: tl.constexpr, K: tl.constexpr, BK: tl.constexpr, NKB: tl.constexpr,
                     GATE_FROM_RAW: tl.constexpr, FLOOR: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                     BR: tl.constexpr, BASE2: tl.constexpr = False, FULL: tl.constexpr = False):
    # The gate's chunk cumsum (the first NGATE programs: chunk, value head, key block) and the q / k l2norm
    # (the rest) in one launch: two independent memory-bound steps, one launch's ramp and tail
    # (launch table gate merge_l2norm).
    pid = tl.program_id(0)
    if pid < NGATE:
        _gate_cumsum_program(g, G, A_log, dt_bias, chunk_start, chunk_len, pid, HV, K, BK, NKB, GATE_FROM_RAW, FLOOR,
                             BASE2, FULL)
    else:
        p = pid - NGATE
        nr = tl.cdiv(R, BR)
        _l2norm_rows(xa, ya, ra, xb, yb, rb, R, p % nr, p // nr, D, DP, BR)


@triton.jit
def _rstd_prologue_kernel(g, G, A_log, dt_bias, chunk_start, chunk_len, q, k, rq, rk, TT, NGATE,
                          HV: tl.constexpr, K: tl.constexpr, BK: tl.constexpr, NKB: tl.constexpr,
                          GATE_FROM_RAW: tl.constexpr, FLOOR: tl.constexpr, H: tl.constexpr, KP: tl.constexpr,
                          BT: tl.constexpr, BASE2: tl.constexpr = False, FULL: tl.constexpr = False):
    # The gate's chunk cumsum (the first NGATE programs) and the q / k rstd of the norm on load (the
    # rest: token block fastest, then head, then q / k) in one launch (launch table gate merge_rstd).
    pid = tl.program_id(0)
    if pid < NGATE:
        _gate_cumsum_program(g, G, A_log, dt_bias, chunk_start, chunk_len, pid, HV, K, BK, NKB, GATE_FROM_RAW, FLOOR,
                             BASE2, FULL)
    else:
        p = pid - NGATE
        nt = tl.cdiv(TT, BT)
        _rstd_tile(q, k, rq, rk, TT, p % nt, ((p // nt) % H).to(tl.int64), p // (nt * H), H, K, KP, BT)


@triton.jit
def _gram_kernel(q, k, G, Araw, Aqk, rq, rk, chunk_start, chunk_len, TT,
                 H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, KP: tl.constexpr,
                 BK: tl.constexpr, PREC: tl.constexpr, NORM: tl.constexpr, BASE2: tl.constexpr = False,
                 FULL: tl.constexpr = False):
    # Steps 3-5 for the 16 rows of sub-chunk a = program_id(2):
    # Araw[t,i] = sum_c k_t k_i e^{G_t-G_i} (i<t),  Aqk[t,i] = sum_c q_t k_i e^{G_t-G_i} (i<=t).
    # the four sub-chunks of a chunk are adjacent programs, so the earlier sub-chunks' k and G rows
    # each reads are L2 hits (with the sub-chunk as the slowest grid axis they came from DRAM: 18% L2
    # hit rate, 75% of DRAM bandwidth in Nsight Compute)
    # NORM (the fused q/k L2 norm applied on load in a forward no backward follows, launch table l2norm
    # on_load): q and k arrive raw with their rstd rq / rk head-major [H, TT] (_rstd_kernel); the norm
    # is a row scaling of both products, so the accumulators are scaled once at the end.
    i_c = tl.program_id(0) // 4
    a = tl.program_id(0) % 4
    i_hv = tl.program_id(1).to(tl.int64)
    i_h = i_hv // (HV // H)
    t0, n = chunk_place(chunk_start, chunk_len, i_c, FULL)
    if a * 16 < n:
        o_s = tl.arange(0, 16)
        o_t = tl.arange(0, 64)
        rows = a * 16 + o_s
        m_r = rows < n
        # Off-diagonal: columns i in earlier sub-chunks, through the reference token r = 16a (the
        # first of sub-chunk a): i < r <= t, so both exponents are <= 0 (docs/kda.md, step 3).
        b_aq = tl.zeros([16, 64], dtype=tl.float32)
        b_ak = tl.zeros([16, 64], dtype=tl.float32)
        m_prev = o_t < a * 16
        p_gr = G + ((t0 + a * 16) * HV + i_hv) * K
        for kb in range(0, (a > 0).to(tl.int32) * (KP // BK)):  # zero trips for a == 0
            o_k = kb * BK + tl.arange(0, BK)
            m_k = o_k < K
            m_rk = m_r[:, None] & m_k[None, :]
            b_q = tl.load(q + ((t0 + rows[:, None]) * H + i_h) * K + o_k[None, :], mask=m_rk, other=0).to(tl.float32)
            b_k = tl.load(k + ((t0 + rows[:, None]) * H + i_h) * K + o_k[None, :], mask=m_rk, other=0).to(tl.float32)
            b_g = tl.load(G + ((t0 + rows[:, None]) * HV + i_hv) * K + o_k[None, :], mask=m_rk, other=0)
            b_gr = tl.load(p_gr + o_k, mask=m_k, other=0)
            m_p = m_prev[:, None] & m_k[None, :]
            b_kp = tl.load(k + ((t0 + o_t[:, None]) * H + i_h) * K + o_k[None, :], mask=m_p, other=0).to(tl.float32)
            b_gp = tl.load(G + ((t0 + o_t[:, None]) * HV + i_hv) * K + o_k[None, :], mask=m_p, other=0)
            b_kp = b_kp * exp_g(tl.minimum(b_gr[None, :] - b_gp, 0.0), BASE2)
            b_dec = exp_g(tl.minimum(b_g - b_gr[None, :], 0.0), BASE2)
            b_aq += tl.dot(b_q * b_dec, tl.trans(b_kp), input_precision=PREC)
            b_ak += tl.dot(b_k * b_dec, tl.trans(b_kp), input_precision=PREC)
        if NORM:  # both products scale by the norms' rstd of their row and of their column
            b_r = tl.load(rk + i_h * TT + t0 + o_t, mask=m_prev, other=0)
            b_aq = b_aq * tl.load(rq + i_h * TT + t0 + rows, mask=m_r, other=0)[:, None] * b_r[None, :]
            b_ak = b_ak * tl.load(rk + i_h * TT + t0 + rows, mask=m_r, other=0)[:, None] * b_r[None, :]
        p_row = ((t0 + rows[:, None]) * HV + i_hv) * 64
        m_off = m_r[:, None] & (o_t[None, :] < a * 16)
        # (nothing above the diagonal is stored: every reader masks to the lower triangle)
        tl.store(Aqk + p_row + o_t[None, :], b_aq, mask=m_off)
        tl.store(Araw + p_row + o_t[None, :], b_ak, mask=m_off)
        # The diagonal 16x16 block is _gram_diag_kernel's (token-parallel, only the needed columns).


@triton.jit
def _gram_diag_kernel(q, k, G, Araw, Aqk, rq, rk, chunk_start, chunk_len, TT,
                      H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, KP: tl.constexpr, BH: tl.constexpr,
                      NORM: tl.constexpr, BASE2: tl.constexpr = False, FULL: tl.constexpr = False,
                      FILL: tl.constexpr = False):
    # Step 3's diagonal 16x16 blocks, token-parallel: one program per (chunk row r, BH value heads)
    # loops over j = start of r's sub-chunk .. r on [BH, K] tiles with exact pairwise decays,
    # Aqk[r, j] = sum_c q_r k_j e^{G_r - G_j} (j <= r), Araw[r, j] the same with k_r (j < r). Only the
    # needed columns are evaluated (a [16, K] tile per row spent half its exponentials on masked
    # entries: 1.56 ms against 1.105 at 1M tokens x heads on an H100, sweep_v10_gram_diag_h100.txt), and
    # BH heads per program share the loop's addressing. No serial chain across rows. NORM: q / k raw,
    # scaled on load by their rstd rq / rk [H, TT].
    i_c = tl.program_id(0) // 64
    r = tl.program_id(0) % 64
    o_hv = tl.program_id(1).to(tl.int64) * BH + tl.arange(0, BH)
    o_h = o_hv // (HV // H)
    t0, n = chunk_place(chunk_start, chunk_len, i_c, FULL)
    if r < n:
        a0 = (r // 16) * 16
        o_k = tl.arange(0, KP)
        m_hk = (o_hv < HV)[:, None] & (o_k < K)[None, :]
        p_qk = o_h[:, None] * K + o_k[None, :]
        p_g = o_hv[:, None] * K + o_k[None, :]
        b_qr = tl.load(q + (t0 + r) * H * K + p_qk, mask=m_hk, other=0).to(tl.float32)
        b_kr = tl.load(k + (t0 + r) * H * K + p_qk, mask=m_hk, other=0).to(tl.float32)
        b_gr = tl.load(G + (t0 + r) * HV * K + p_g, mask=m_hk, other=0)
        m_h = o_hv < HV
        if NORM:
            b_qr = b_qr * tl.load(rq + o_h * TT + t0 + r, mask=m_h, other=0)[:, None]
            b_kr = b_kr * tl.load(rk + o_h * TT + t0 + r, mask=m_h, other=0)[:, None]
        # each column stored as it is made (no [BH, 16] accumulators selected into per step: fewer
        # registers, more programs per SM: 0.89 ms against 1.07-1.11 on an H100 at 1M tokens x heads);
        # nothing above the diagonal is stored (every reader masks to the lower triangle)
        for j in range(a0, r + 1):
            _diag_column(q, k, G, Araw, Aqk, rk, b_qr, b_kr, b_gr, t0, r, j, o_h, o_hv, p_qk, p_g, m_hk, m_h, TT,
                         H, HV, K, NORM, BASE2)
        if FILL:  # zeros above the diagonal within the block: every 32-byte sector of the row written whole
            # (a sector left partly written is merged in L2 with what DRAM holds; H100, session 21: the
            # kernel 0.99 -> 0.876 ms at B8 T4K H32, gram_diag fill)
            o_s = tl.arange(0, 16)
            p_f = ((t0 + r) * HV + o_hv[:, None]) * 64 + a0 + o_s[None, :]
            m_f = m_h[:, None] & (a0 + o_s > r)[None, :]
            tl.store(Aqk + p_f, tl.zeros([BH, 16], dtype=tl.float32), mask=m_f)
            tl.store(Araw + p_f, tl.zeros([BH, 16], dtype=tl.float32), mask=m_f)


@triton.jit
def _diag_column(q, k, G, Araw, Aqk, rk, b_qr, b_kr, b_gr, t0, r, j, o_h, o_hv, p_qk, p_g, m_hk, m_h, TT,
                 H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, NORM: tl.constexpr, BASE2: tl.constexpr):
    """Column j <= r of row r of the diagonal block, for BH value heads: Aqk[r, j] and Araw[r, j]."""
    b_kj = tl.load(k + (t0 + j) * H * K + p_qk, mask=m_hk, other=0).to(tl.float32)
    if NORM:
        b_kj = b_kj * tl.load(rk + o_h * TT + t0 + j, mask=m_h, other=0)[:, None]
    b_gj = tl.load(G + (t0 + j) * HV * K + p_g, mask=m_hk, other=0)
    # G is a prefix sum of gates <= 0, so G_r - G_j <= 0 for j <= r up to G's own rounding (a parallel
    # prefix sum need not be monotone by an ulp): the clamp absorbs that (without it: no faster, session 16)
    b_e = exp_g(tl.minimum(b_gr - b_gj, 0.0), BASE2) * b_kj
    p_j = ((t0 + r) * HV + o_hv) * 64 + j
    tl.store(Aqk + p_j, tl.sum(b_e * b_qr, axis=1), mask=m_h)
    tl.store(Araw + p_j, tl.where(j < r, tl.sum(b_e * b_kr, axis=1), 0.0), mask=m_h)


@triton.jit
def _load_block(base, t0, n, i_hv, HV: tl.constexpr, a: tl.constexpr, b: tl.constexpr):
    """The 16x16 block (row sub-chunk a, column sub-chunk b) of a per-chunk [64, 64] matrix."""
    o_s = tl.arange(0, 16)
    rows = a * 16 + o_s
    return tl.load(base + ((t0 + rows[:, None]) * HV + i_hv) * 64 + b * 16 + o_s[None, :],
                   mask=(rows < n)[:, None], other=0)


@triton.jit
def _store_block(base, x, t0, n, i_hv, HV: tl.constexpr, a: tl.constexpr, b: tl.constexpr):
    o_s = tl.arange(0, 16)
    rows = a * 16 + o_s
    tl.store(base + ((t0 + rows[:, None]) * HV + i_hv) * 64 + b * 16 + o_s[None, :], x, mask=(rows < n)[:, None])


@triton.jit
def _store_lower_blocks(base, x10, x20, x21, x30, x31, x32, t0, n, i_hv, HV: tl.constexpr):
    """The six 16x16 blocks below the diagonal of a per-chunk [64, 64] matrix, block (a, b) as ``xab``."""
    _store_block(base, x10, t0, n, i_hv, HV, 1, 0)
    _store_block(base, x20, t0, n, i_hv, HV, 2, 0)
    _store_block(base, x21, t0, n, i_hv, HV, 2, 1)
    _store_block(base, x30, t0, n, i_hv, HV, 3, 0)
    _store_block(base, x31, t0, n, i_hv, HV, 3, 1)
    _store_block(base, x32, t0, n, i_hv, HV, 3, 2)


@triton.jit
def scan_program(HV: tl.constexpr, KP: tl.constexpr, BV: tl.constexpr):
    """Where a state-scan program works (grid (V-tiles, sequences x value heads)): its sequence ``i_n``,
    value head, and key / column / chunk-row ranges."""
    i_v = tl.program_id(0)
    i_nh = tl.program_id(1)
    return i_nh // HV, (i_nh % HV).to(tl.int64), tl.arange(0, KP), i_v * BV + tl.arange(0, BV), tl.arange(0, 64)


@triton.jit
def sequence_chunks(seq_start, chunk_first, i_n):
    """Sequence ``i_n``'s chunks ``c0 .. c1 - 1`` and tokens ``bos .. eos - 1``: consecutive 64-token
    blocks from ``bos``, so a scan's addresses follow from the chunk index alone (no dependent loads in
    its loop: the next chunk's loads can be issued early)."""
    c0 = tl.load(chunk_first + i_n)
    c1 = tl.load(chunk_first + i_n + 1)
    return c0, c1, tl.load(seq_start + i_n).to(tl.int64), tl.load(seq_start + i_n + 1).to(tl.int64)


@triton.jit
def lower_triangle(o_t, n):
    """Mask of the entries (t, i <= t), t < n, of a per-chunk [64, 64] matrix: the kernels store nothing
    above the diagonal of Araw, Aqk and M, so every reader masks with this."""
    return (o_t < n)[:, None] & (o_t[None, :] <= o_t[:, None])


@triton.jit
def load_beta(beta, t0, rows, n, i_hv, HV: tl.constexpr, BETA_SIGMOID: tl.constexpr):
    """beta of the given chunk rows (0 beyond the chunk), sigmoid applied to logits when fused."""
    m = rows < n
    b = tl.load(beta + (t0 + rows) * HV + i_hv, mask=m, other=0).to(tl.float32)
    if BETA_SIGMOID:
        b = tl.where(m, tl.sigmoid(b), 0.0)
    return b


@triton.jit
def _substitute_row(Araw, beta, b_Mi, i, t0, n, i_hv, HV: tl.constexpr, BETA_SIGMOID: tl.constexpr):
    """Row i of the four diagonal blocks' inverses: e_i - sum_{j<i} L[i, j] M[j, :] ([4, 16, 16] tiles)."""
    o_s = tl.arange(0, 16)
    o_a = tl.arange(0, 4)
    r_i = o_a * 16 + i  # [4]
    b_bi = load_beta(beta, t0, r_i, n, i_hv, HV, BETA_SIGMOID)
    p_li = Araw + ((t0 + r_i[:, None]) * HV + i_hv) * 64 + o_a[:, None] * 16 + o_s[None, :]
    b_li = tl.load(p_li, mask=(r_i < n)[:, None] & (o_s < i)[None, :], other=0) * b_bi[:, None]
    b_upd = tl.sum(b_li[:, :, None] * b_Mi, axis=1)  # [4, 16]: sum_j L[i, j] M[j, :]
    return tl.where((o_s == i)[None, :, None], b_Mi - b_upd[:, None, :], b_Mi)


@triton.jit
def _invert_diagonal_blocks(beta, Araw, M, t0, n, i_hv, HV: tl.constexpr, BETA_SIGMOID: tl.constexpr):
    """The inverses of the four diagonal 16x16 blocks of I + Diag(beta) Araw, stored to M and returned
    as four [16, 16] tiles (read back: the substitution's [4, 16, 16] layout is not theirs)."""
    o_s = tl.arange(0, 16)
    o_a = tl.arange(0, 4)
    # (1) the four diagonal 16x16 blocks at once, by forward substitution: row i of (I+L)^-1 is
    #     e_i - sum_{j<i} L[i,j] row_j.
    rows3 = o_a[:, None] * 16 + o_s[None, :]  # [4, 16] chunk rows
    b_eye = (o_s[:, None] == o_s[None, :]).to(tl.float32)
    b_Mi = tl.zeros([4, 16, 16], dtype=tl.float32) + b_eye[None, :, :]
    # row i of each block read from memory (an L1 hit) instead of extracted from registers: the
    # extraction is a cross-thread reduction per step, on the loop's critical path
    # unrolled, so the 15 row loads need not wait on the serial updates (1.134 -> 1.122 ms with the
    # products at 1M tokens x heads on an H100, session 7)
    for i in tl.static_range(1, 16):
        b_Mi = _substitute_row(Araw, beta, b_Mi, i, t0, n, i_hv, HV, BETA_SIGMOID)
    tl.store(M + ((t0 + rows3[:, :, None]) * HV + i_hv) * 64 + o_a[:, None, None] * 16 + o_s[None, None, :],
             b_Mi, mask=(rows3 < n)[:, :, None])
    tl.debug_barrier()
    return (_load_block(M, t0, n, i_hv, HV, 0, 0), _load_block(M, t0, n, i_hv, HV, 1, 1),
            _load_block(M, t0, n, i_hv, HV, 2, 2), _load_block(M, t0, n, i_hv, HV, 3, 3))


@triton.jit
def _invert_chunk(beta, Araw, M, t0, n, i_hv, HV: tl.constexpr, BETA_SIGMOID: tl.constexpr, PREC: tl.constexpr):
    """Step 4's M = (I + Diag(beta) Araw)^-1 of one chunk, written to M (fp32, whole [64, 64])."""
    m00, m11, m22, m33 = _invert_diagonal_blocks(beta, Araw, M, t0, n, i_hv, HV, BETA_SIGMOID)
    o_s = tl.arange(0, 16)
    b1 = load_beta(beta, t0, 16 + o_s, n, i_hv, HV, BETA_SIGMOID)[:, None]
    b2 = load_beta(beta, t0, 32 + o_s, n, i_hv, HV, BETA_SIGMOID)[:, None]
    b3 = load_beta(beta, t0, 48 + o_s, n, i_hv, HV, BETA_SIGMOID)[:, None]
    l10 = _load_block(Araw, t0, n, i_hv, HV, 1, 0) * b1
    l20 = _load_block(Araw, t0, n, i_hv, HV, 2, 0) * b2
    l21 = _load_block(Araw, t0, n, i_hv, HV, 2, 1) * b2
    l30 = _load_block(Araw, t0, n, i_hv, HV, 3, 0) * b3
    l31 = _load_block(Araw, t0, n, i_hv, HV, 3, 1) * b3
    l32 = _load_block(Araw, t0, n, i_hv, HV, 3, 2) * b3
    _store_offdiagonal_inverse(M, m00, m11, m22, m33, l10, l20, l21, l30, l31, l32, t0, n, i_hv, HV, PREC)


@triton.jit
def _store_offdiagonal_inverse(M, m00, m11, m22, m33, l10, l20, l21, l30, l31, l32, t0, n, i_hv, HV: tl.constexpr,
                               PREC: tl.constexpr):
    """The off-diagonal 16x16 blocks of M from the diagonal blocks' inverses m_aa and the blocks l_ab of
    L = Diag(beta) Araw below the diagonal: M_ab = -M_aa sum_{b<=j<a} L_aj M_jb, stored to M."""
    m10 = -tl.dot(m11, tl.dot(l10, m00, input_precision=PREC), input_precision=PREC)
    m21 = -tl.dot(m22, tl.dot(l21, m11, input_precision=PREC), input_precision=PREC)
    m32 = -tl.dot(m33, tl.dot(l32, m22, input_precision=PREC), input_precision=PREC)
    m20 = -tl.dot(m22, tl.dot(l20, m00, input_precision=PREC) + tl.dot(l21, m10, input_precision=PREC),
                  input_precision=PREC)
    m31 = -tl.dot(m33, tl.dot(l31, m11, input_precision=PREC) + tl.dot(l32, m21, input_precision=PREC),
                  input_precision=PREC)
    m30 = -tl.dot(m33, tl.dot(l30, m00, input_precision=PREC) + tl.dot(l31, m10, input_precision=PREC)
                  + tl.dot(l32, m20, input_precision=PREC), input_precision=PREC)
    _store_lower_blocks(M, m10, m20, m21, m30, m31, m32, t0, n, i_hv, HV)  # (those above are never read)


@triton.jit
def _decayed_rows(q, k, G, t0, n, a: tl.constexpr, o_k, m_k, i_h, i_hv, H: tl.constexpr, HV: tl.constexpr,
                  K: tl.constexpr, BASE2: tl.constexpr):
    """Sub-chunk a's rows through its reference token 16a (its first): q and k times e^{G_t - G_16a}
    (exponents <= 0), fp32 [16, BK]; with its k and G rows (the columns of later sub-chunks' blocks) and
    the reference row of G [BK]. Rows past the chunk read as zeros."""
    rows = a * 16 + tl.arange(0, 16)
    m_rk = (rows < n)[:, None] & m_k[None, :]
    p_qk = ((t0 + rows[:, None]) * H + i_h) * K + o_k[None, :]
    b_q = tl.load(q + p_qk, mask=m_rk, other=0).to(tl.float32)
    b_k = tl.load(k + p_qk, mask=m_rk, other=0).to(tl.float32)
    b_g = tl.load(G + ((t0 + rows[:, None]) * HV + i_hv) * K + o_k[None, :], mask=m_rk, other=0)
    b_gr = tl.load(G + ((t0 + a * 16) * HV + i_hv) * K + o_k, mask=m_k & (a * 16 < n), other=0)
    b_dec = exp_g(tl.minimum(b_g - b_gr[None, :], 0.0), BASE2)
    return b_q * b_dec, b_k * b_dec, b_k, b_g, b_gr


@triton.jit
def _columns_to(b_k, b_g, b_gr, BASE2: tl.constexpr):
    """An earlier sub-chunk's k rows decayed to a later sub-chunk's reference row, transposed [BK, 16]:
    k_i e^{G_ref - G_i} with i < ref (exponents <= 0)."""
    return tl.trans(b_k * exp_g(tl.minimum(b_gr[None, :] - b_g, 0.0), BASE2))


@triton.jit
def _add_block(aq, ak, b_q, b_kd, b_c, PREC: tl.constexpr):
    """One key block's share of an off-diagonal 16x16 block of Aqk and of Araw: the row sub-chunk's decayed
    q and k [16, BK] times the column sub-chunk's decayed k, transposed [BK, 16] (_columns_to)."""
    return aq + tl.dot(b_q, b_c, input_precision=PREC), ak + tl.dot(b_kd, b_c, input_precision=PREC)


@triton.jit
def _gram_solve_kernel(q, k, G, beta, Araw, Aqk, M, rq, rk, chunk_start, chunk_len, TT,
                       H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, KP: tl.constexpr, BK: tl.constexpr,
                       PREC: tl.constexpr, NORM: tl.constexpr, BETA_SIGMOID: tl.constexpr, STORE_ARAW: tl.constexpr,
                       BASE2: tl.constexpr = False, FULL: tl.constexpr = False):
    # Steps 3-4 of one (chunk, value head) after the diagonal gram: the six off-diagonal 16x16 blocks of
    # Aqk and Araw (block (a, b), b < a, through sub-chunk a's first token: both factors <= 1, as in
    # _gram_kernel), Aqk's stored, Araw's kept in registers for the inverse (stored only where a backward
    # reads them: STORE_ARAW), then M = (I + Diag(beta) Araw)^-1 with the diagonal blocks of Araw (the
    # diagonal gram's) from memory. One launch and no Araw round trip instead of _gram_kernel +
    # _inverse_kernel (FLA 0.6.0 fuses these two stages likewise). NORM: q / k raw, rstd rq / rk [H, TT].
    i_c = tl.program_id(0)
    i_hv = tl.program_id(1).to(tl.int64)
    i_h = i_hv // (HV // H)
    t0, n = chunk_place(chunk_start, chunk_len, i_c, FULL)
    aq10 = tl.zeros([16, 16], dtype=tl.float32)
    ak10 = tl.zeros([16, 16], dtype=tl.float32)
    aq20 = tl.zeros([16, 16], dtype=tl.float32)
    ak20 = tl.zeros([16, 16], dtype=tl.float32)
    aq21 = tl.zeros([16, 16], dtype=tl.float32)
    ak21 = tl.zeros([16, 16], dtype=tl.float32)
    aq30 = tl.zeros([16, 16], dtype=tl.float32)
    ak30 = tl.zeros([16, 16], dtype=tl.float32)
    aq31 = tl.zeros([16, 16], dtype=tl.float32)
    ak31 = tl.zeros([16, 16], dtype=tl.float32)
    aq32 = tl.zeros([16, 16], dtype=tl.float32)
    ak32 = tl.zeros([16, 16], dtype=tl.float32)
    for kb in range(0, KP // BK):
        o_k = kb * BK + tl.arange(0, BK)
        m_k = o_k < K
        _, _, k0, g0, _ = _decayed_rows(q, k, G, t0, n, 0, o_k, m_k, i_h, i_hv, H, HV, K, BASE2)
        q1, k1d, k1, g1, r1 = _decayed_rows(q, k, G, t0, n, 1, o_k, m_k, i_h, i_hv, H, HV, K, BASE2)
        q2, k2d, k2, g2, r2 = _decayed_rows(q, k, G, t0, n, 2, o_k, m_k, i_h, i_hv, H, HV, K, BASE2)
        q3, k3d, _, _, r3 = _decayed_rows(q, k, G, t0, n, 3, o_k, m_k, i_h, i_hv, H, HV, K, BASE2)
        aq10, ak10 = _add_block(aq10, ak10, q1, k1d, _columns_to(k0, g0, r1, BASE2), PREC)
        aq20, ak20 = _add_block(aq20, ak20, q2, k2d, _columns_to(k0, g0, r2, BASE2), PREC)
        aq21, ak21 = _add_block(aq21, ak21, q2, k2d, _columns_to(k1, g1, r2, BASE2), PREC)
        aq30, ak30 = _add_block(aq30, ak30, q3, k3d, _columns_to(k0, g0, r3, BASE2), PREC)
        aq31, ak31 = _add_block(aq31, ak31, q3, k3d, _columns_to(k1, g1, r3, BASE2), PREC)
        aq32, ak32 = _add_block(aq32, ak32, q3, k3d, _columns_to(k2, g2, r3, BASE2), PREC)
    o_s = tl.arange(0, 16)
    if NORM:  # both products scale by the norms' rstd of their row and of their column
        p_r = i_h * TT + t0 + o_s
        rq1 = tl.load(rq + p_r + 16, mask=16 + o_s < n, other=0)[:, None]
        rq2 = tl.load(rq + p_r + 32, mask=32 + o_s < n, other=0)[:, None]
        rq3 = tl.load(rq + p_r + 48, mask=48 + o_s < n, other=0)[:, None]
        rk0 = tl.load(rk + p_r, mask=o_s < n, other=0)
        rk1 = tl.load(rk + p_r + 16, mask=16 + o_s < n, other=0)
        rk2 = tl.load(rk + p_r + 32, mask=32 + o_s < n, other=0)
        rk3 = tl.load(rk + p_r + 48, mask=48 + o_s < n, other=0)
        aq10, ak10 = aq10 * rq1 * rk0[None, :], ak10 * rk1[:, None] * rk0[None, :]
        aq20, ak20 = aq20 * rq2 * rk0[None, :], ak20 * rk2[:, None] * rk0[None, :]
        aq21, ak21 = aq21 * rq2 * rk1[None, :], ak21 * rk2[:, None] * rk1[None, :]
        aq30, ak30 = aq30 * rq3 * rk0[None, :], ak30 * rk3[:, None] * rk0[None, :]
        aq31, ak31 = aq31 * rq3 * rk1[None, :], ak31 * rk3[:, None] * rk1[None, :]
        aq32, ak32 = aq32 * rq3 * rk2[None, :], ak32 * rk3[:, None] * rk2[None, :]
    _store_lower_blocks(Aqk, aq10, aq20, aq21, aq30, aq31, aq32, t0, n, i_hv, HV)
    if STORE_ARAW:
        _store_lower_blocks(Araw, ak10, ak20, ak21, ak30, ak31, ak32, t0, n, i_hv, HV)
    m00, m11, m22, m33 = _invert_diagonal_blocks(beta, Araw, M, t0, n, i_hv, HV, BETA_SIGMOID)
    b1 = load_beta(beta, t0, 16 + o_s, n, i_hv, HV, BETA_SIGMOID)[:, None]
    b2 = load_beta(beta, t0, 32 + o_s, n, i_hv, HV, BETA_SIGMOID)[:, None]
    b3 = load_beta(beta, t0, 48 + o_s, n, i_hv, HV, BETA_SIGMOID)[:, None]
    _store_offdiagonal_inverse(M, m00, m11, m22, m33, ak10 * b1, ak20 * b2, ak21 * b2, ak30 * b3, ak31 * b3,
                               ak32 * b3, t0, n, i_hv, HV, PREC)


@triton.jit
def _inverse_kernel(beta, Araw, M, chunk_start, chunk_len, HV: tl.constexpr, BETA_SIGMOID: tl.constexpr,
                    PREC: tl.constexpr, FULL: tl.constexpr = False):
    # Step 4's inverse alone (the split solve): one program per (chunk, value head), small tiles, so
    # that many programs share an SM while each walks its serial forward substitution.
    i_c = tl.program_id(0)
    i_hv = tl.program_id(1).to(tl.int64)
    t0, n = chunk_place(chunk_start, chunk_len, i_c, FULL)
    _invert_chunk(beta, Araw, M, t0, n, i_hv, HV, BETA_SIGMOID, PREC)


@triton.jit
def _wu_kernel(q, k, v, beta, G, M, U, Wk, Qg, Kd, rq, rk, chunk_start, chunk_len, TT,
               H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
               BV: tl.constexpr, NB: tl.constexpr, BETA_SIGMOID: tl.constexpr, PREC: tl.constexpr,
               NORM: tl.constexpr, BASE2: tl.constexpr = False, FULL: tl.constexpr = False):
    # Step 4's products, one program per (chunk, value head, column block of BV): U = M Diag(beta) V,
    # Wk = M Diag(beta) (e^G k), and the decayed q and k the scans and the output use: Qg = e^G q
    # (step 5), Kd = e^{G_last - G} k (step 7). Memory-bound: every load is issued before the first
    # product, so they are in flight together. A chunk's column blocks are adjacent programs (the
    # second read of M is an L2 hit). NORM: q / k raw, their rows scaled by their rstd rq / rk [H, TT].
    i_c = tl.program_id(0) // NB
    cb = (tl.program_id(0) % NB) * BV
    i_hv = tl.program_id(1).to(tl.int64)
    i_h = i_hv // (HV // H)
    t0, n = chunk_place(chunk_start, chunk_len, i_c, FULL)
    o_t = tl.arange(0, 64)
    o_c = cb + tl.arange(0, BV)
    m_t = o_t < n
    m_tv = m_t[:, None] & (o_c < V)[None, :]
    m_k = o_c < K
    m_tk = m_t[:, None] & m_k[None, :]
    p_v = ((t0 + o_t[:, None]) * HV + i_hv) * V + o_c[None, :]
    p_qk = ((t0 + o_t[:, None]) * H + i_h) * K + o_c[None, :]
    p_g = ((t0 + o_t[:, None]) * HV + i_hv) * K + o_c[None, :]
    b_M = tl.load(M + ((t0 + o_t[:, None]) * HV + i_hv) * 64 + o_t[None, :], mask=lower_triangle(o_t, n), other=0)
    b_beta = load_beta(beta, t0, o_t, n, i_hv, HV, BETA_SIGMOID)
    b_v = tl.load(v + p_v, mask=m_tv, other=0)
    b_k = tl.load(k + p_qk, mask=m_tk, other=0).to(tl.float32)
    b_q = tl.load(q + p_qk, mask=m_tk, other=0).to(tl.float32)
    b_g = tl.load(G + p_g, mask=m_tk, other=0)
    b_gl = tl.load(G + ((t0 + n - 1) * HV + i_hv) * K + o_c, mask=m_k, other=0)
    if cb < V:
        b_u = tl.dot(b_M, b_v.to(tl.float32) * b_beta[:, None], input_precision=PREC)
        tl.store(U + p_v, b_u.to(U.dtype.element_ty), mask=m_tv)
    if cb < K:
        b_eg = exp_g(b_g, BASE2)
        if NORM:  # the rows' rstd folded into the row scales the products take anyway (80 registers at
            # 8 warps for sm_90a, three programs per SM; scaling the loaded q / k tiles took 86, two per SM)
            p_r = i_h * TT + t0 + o_t
            b_rk = tl.load(rk + p_r, mask=m_t, other=0)
            tl.store(Qg + p_g, (b_q * b_eg * tl.load(rq + p_r, mask=m_t, other=0)[:, None]).to(Qg.dtype.element_ty),
                     mask=m_tk)
            b_ed = exp_g(tl.minimum(b_gl[None, :] - b_g, 0.0), BASE2) * b_rk[:, None]
            tl.store(Kd + p_g, (b_k * b_ed).to(Kd.dtype.element_ty), mask=m_tk)
            b_wk = tl.dot(b_M, b_k * b_eg * (b_beta * b_rk)[:, None], input_precision=PREC)
        else:
            tl.store(Qg + p_g, (b_q * b_eg).to(Qg.dtype.element_ty), mask=m_tk)
            tl.store(Kd + p_g, (b_k * exp_g(tl.minimum(b_gl[None, :] - b_g, 0.0), BASE2)).to(Kd.dtype.element_ty),
                     mask=m_tk)
            b_wk = tl.dot(b_M, b_k * b_eg * b_beta[:, None], input_precision=PREC)
        tl.store(Wk + p_g, b_wk.to(Wk.dtype.element_ty), mask=m_tk)


@triton.jit
def _state_fwd_kernel(Kd, G, U, Wk, W, h, h0, ht, Qg, Aqk, o, seq_start, chunk_first, scale,
                      HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                      KP: tl.constexpr, BV: tl.constexpr, HAS_INIT: tl.constexpr,
                      STORE_FINAL: tl.constexpr, OUTPUT: tl.constexpr, PREC: tl.constexpr,
                      STORE_SAVED: tl.constexpr = True, BASE2: tl.constexpr = False):
    # Steps 6-7 for one [K, BV] column tile of one (sequence, value head): a scan over chunks.
    # Matrix operands in the input dtype (fp32 accumulation), the state itself in fp32.
    # OUTPUT: step 5 inside the scan (o = scale (Qg S_0 + Aqk W) per chunk, off the state's serial
    # path), so _output_kernel and its read of h go away (h is still stored for the backward).
    # STORE_SAVED False (a forward with no backward to follow, output inside the scan): h and W, which
    # only the backward reads then, are not stored (768 of the scan's ~2.2 KB per (token, head) moved).
    DT: tl.constexpr = Wk.dtype.element_ty
    i_n, i_hv, o_k, o_v, o_t = scan_program(HV, KP, BV)
    m_k = o_k < K
    m_kv = m_k[:, None] & (o_v < V)[None, :]
    p_state = (i_n.to(tl.int64) * HV + i_hv) * K * V + o_k[:, None] * V + o_v[None, :]
    b_S = tl.zeros([KP, BV], dtype=tl.float32)
    if HAS_INIT:
        b_S = tl.load(h0 + p_state, mask=m_kv, other=0).to(tl.float32)
    c0, c1, bos, eos = sequence_chunks(seq_start, chunk_first, i_n)
    for c in range(c0, c1):
        t0 = bos + (c - c0) * 64
        n = tl.minimum(eos - t0, 64)
        if STORE_SAVED:
            tl.store(h + ((c * HV + i_hv) * K + o_k[:, None]) * V + o_v[None, :],
                     b_S.to(h.dtype.element_ty), mask=m_kv)
        m_t = o_t < n
        m_tk = m_t[:, None] & m_k[None, :]
        m_tv = m_t[:, None] & (o_v < V)[None, :]
        p_tk = ((t0 + o_t[:, None]) * HV + i_hv) * K + o_k[None, :]
        p_tv = ((t0 + o_t[:, None]) * HV + i_hv) * V + o_v[None, :]
        b_wk = tl.load(Wk + p_tk, mask=m_tk, other=0)
        b_u = tl.load(U + p_tv, mask=m_tv, other=0).to(tl.float32)
        b_kd = tl.load(Kd + p_tk, mask=m_tk, other=0)
        b_gl = tl.load(G + ((t0 + n - 1) * HV + i_hv) * K + o_k, mask=m_k, other=0)
        b_sh = b_S.to(DT)
        b_w = b_u - tl.dot(b_wk, b_sh, input_precision=PREC)  # step 6
        if STORE_SAVED:
            tl.store(W + p_tv, b_w.to(W.dtype.element_ty), mask=m_tv)
        if OUTPUT:
            b_qg = tl.load(Qg + p_tk, mask=m_tk, other=0)
            b_a = tl.load(Aqk + ((t0 + o_t[:, None]) * HV + i_hv) * 64 + o_t[None, :], mask=lower_triangle(o_t, n),
                          other=0)
            # W rounded as stored, so that o has the bits of the separate output kernel's (a sequence
            # gives the same o alone and inside a pack that takes the other path); the dot in Aqk's
            # storage type (fp32, or bf16 with half_store aqk: exact products of the stored values)
            b_o = tl.dot(b_qg, b_sh, input_precision=PREC) + tl.dot(b_a, b_w.to(DT).to(b_a.dtype), input_precision=PREC)
            tl.store(o + p_tv, (scale * b_o).to(o.dtype.element_ty), mask=m_tv)
        b_S = b_S * exp_g(b_gl, BASE2)[:, None] + tl.dot(tl.trans(b_kd), b_w.to(DT), input_precision=PREC)  # step 7
    if STORE_FINAL:
        tl.store(ht + p_state, b_S, mask=m_kv)


@triton.jit
def _output_kernel(Qg, Aqk, W, h, o, chunk_start, chunk_len, scale,
                   H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                   KP: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr, FULL: tl.constexpr = False):
    # Step 5: O = scale * ((e^G q) S_0 + Aqk W). The V-tiles of a chunk are adjacent programs, so the
    # second one's Qg and Aqk reads are L2 hits (with the V-tile as the slowest grid axis: 14% L2 hits).
    NV: tl.constexpr = (V + BV - 1) // BV
    i_c = tl.program_id(0) // NV
    i_v = tl.program_id(0) % NV
    i_hv = tl.program_id(1).to(tl.int64)
    t0, n = chunk_place(chunk_start, chunk_len, i_c, FULL)
    o_t = tl.arange(0, 64)
    o_k = tl.arange(0, KP)
    o_v = i_v * BV + tl.arange(0, BV)
    m_t = o_t < n
    m_k = o_k < K
    m_tk = m_t[:, None] & m_k[None, :]
    m_tv = m_t[:, None] & (o_v < V)[None, :]
    b_qg = tl.load(Qg + ((t0 + o_t[:, None]) * HV + i_hv) * K + o_k[None, :], mask=m_tk, other=0)
    b_h = tl.load(h + ((i_c.to(tl.int64) * HV + i_hv) * K + o_k[:, None]) * V + o_v[None, :],
                  mask=m_k[:, None] & (o_v < V)[None, :], other=0)
    b_a = tl.load(Aqk + ((t0 + o_t[:, None]) * HV + i_hv) * 64 + o_t[None, :], mask=lower_triangle(o_t, n), other=0)
    p_tv = ((t0 + o_t[:, None]) * HV + i_hv) * V + o_v[None, :]
    b_w = tl.load(W + p_tv, mask=m_tv, other=0)
    # (the second dot in Aqk's storage type: fp32, or bf16 with half_store aqk)
    b_o = tl.dot(b_qg, b_h, input_precision=PREC) + tl.dot(b_a, b_w.to(b_a.dtype), input_precision=PREC)
    tl.store(o + p_tv, (scale * b_o).to(o.dtype.element_ty), mask=m_tv)


@triton.jit
def _l2norm_fwd_kernel(xa, ya, ra, xb, yb, rb, R, D: tl.constexpr, DP: tl.constexpr, BR: tl.constexpr):
    # Step 0 (fused q/k norm): y = x / sqrt(sum x^2 + 1e-6) per row of D. Grid axis 1 picks the tensor
    # (q and k in one launch: one launch's ramp and tail instead of two).
    _l2norm_rows(xa, ya, ra, xb, yb, rb, R, tl.program_id(0), tl.program_id(1), D, DP, BR)


@triton.jit
def _l2norm_rows(xa, ya, ra, xb, yb, rb, R, i_r, i_x, D: tl.constexpr, DP: tl.constexpr, BR: tl.constexpr):
    """Rows ``i_r * BR ...`` of tensor ``i_x`` (0: a, 1: b) of :func:`_l2norm_fwd_kernel`."""
    x, y, rstd = xa, ya, ra
    if i_x == 1:
        x, y, rstd = xb, yb, rb
    o_r = i_r.to(tl.int64) * BR + tl.arange(0, BR)
    o_d = tl.arange(0, DP)
    m = (o_r < R)[:, None] & (o_d < D)[None, :]
    b_x = tl.load(x + o_r[:, None] * D + o_d[None, :], mask=m, other=0).to(tl.float32)
    b_r = tl.rsqrt(tl.sum(b_x * b_x, axis=1) + 1e-6)
    tl.store(y + o_r[:, None] * D + o_d[None, :], (b_x * b_r[:, None]).to(y.dtype.element_ty), mask=m)
    tl.store(rstd + o_r, b_r, mask=o_r < R)


@triton.jit
def _rstd_kernel(q, k, rq, rk, TT, H: tl.constexpr, K: tl.constexpr, KP: tl.constexpr, BT: tl.constexpr):
    # The fused q/k norm's rstd alone, r = (sum x^2 + 1e-6)^-1/2 per (token, head), head-major [H, TT] so
    # that a chunk's rows are contiguous for the kernels that normalise on load (launch table l2norm
    # on_load). Grid (TT / BT, H, 2): axis 2 picks q or k. Reads x once, writes 4 bytes per row.
    _rstd_tile(q, k, rq, rk, TT, tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2), H, K, KP, BT)


@triton.jit
def _rstd_tile(q, k, rq, rk, TT, i_t, i_h, i_x, H: tl.constexpr, K: tl.constexpr, KP: tl.constexpr, BT: tl.constexpr):
    """Tokens ``i_t * BT ...`` of head ``i_h`` of q (``i_x`` 0) or k (1) of :func:`_rstd_kernel`."""
    x, r = q, rq
    if i_x == 1:
        x, r = k, rk
    o_t = i_t.to(tl.int64) * BT + tl.arange(0, BT)
    o_k = tl.arange(0, KP)
    m_t = o_t < TT
    b_x = tl.load(x + (o_t[:, None] * H + i_h) * K + o_k[None, :], mask=m_t[:, None] & (o_k < K)[None, :],
                  other=0).to(tl.float32)
    tl.store(r + i_h * TT + o_t, tl.rsqrt(tl.sum(b_x * b_x, axis=1) + 1e-6), mask=m_t)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get 3-pass tf32 (about fp32 accuracy); half inputs the single-pass tf32 dot."""
    return "tf32x3" if dtype == torch.float32 else "tf32"


L2NORM_ROWS = 16  # rows per program of the q/k norm kernels (forward, backward, merged launches)
RSTD_ROWS = 32  # tokens per program of _rstd_kernel (one head of q or k)


def _l2norm_outputs(xs) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(y, rstd)`` buffers for each ``x [..., D]``: y like x, rstd fp32 ``[rows]``."""
    return [(chunk_common.alloc(x.shape, x.dtype, x.device),
             chunk_common.alloc((x.numel() // max(x.shape[-1], 1),), torch.float32, x.device)) for x in xs]


def same_shape_dtype(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors can share one l2norm launch (the kernel takes one row count and dtype)."""
    return a.shape == b.shape and a.dtype == b.dtype


def l2norm_fwd(*xs: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Row-wise L2 norm of each ``x [..., D]`` (one launch for two tensors of one shape and dtype, such
    as q and k). Returns ``(y, rstd)`` per input, rstd fp32 ``[rows]``."""
    out = _l2norm_outputs(xs)
    groups = [[0, 1]] if len(xs) == 2 and same_shape_dtype(*xs) else [[i] for i in range(len(xs))]
    for idx in groups:
        x0 = xs[idx[0]]
        D, R = x0.shape[-1], out[idx[0]][1].shape[0]
        if R == 0:
            continue
        flat = [(xs[i].reshape(-1, D), out[i][0].view(-1, D), out[i][1]) for i in idx]
        _l2norm_fwd_kernel[(triton.cdiv(R, L2NORM_ROWS), len(idx))](*flat[0], *flat[-1], R, D=D, DP=pow2(D),
                                                                    BR=L2NORM_ROWS)
    return out


def chunk_kda_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
    *, scale: float, initial_state: torch.Tensor | None, output_final_state: bool, table: ChunkTable,
    A_log: torch.Tensor | None, dt_bias: torch.Tensor | None, beta_sigmoid: bool, qk_l2norm: bool = False,
    for_backward: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
    """Forward over a packed stream. Inputs are ``[Ttot, H|HV, ...]`` contiguous. ``qk_l2norm``: q and
    k arrive raw and are L2-normalised: first by a kernel of its own (the normalised copies and their
    rstd ``[Ttot * H]`` join the returned intermediates as ``q``, ``k``, ``rq``, ``rk``), or, without
    ``for_backward`` and with the launch table's ``l2norm on_load``, by the kernels that read them, from
    the rstd alone (``_rstd_kernel``). Returns ``o [Ttot, HV, V]``, the final states
    ``[N, HV, K, V]`` (or None) and the intermediates the backward reuses. ``for_backward`` False (no
    backward will run: inference, prefill): the intermediates are not returned, and with the launch
    table's ``state_fwd skip_saved`` the scan does not store what only the backward reads."""
    Ttot, H, K = q.shape
    HV, V = v.shape[1], v.shape[2]
    dev = q.device
    KP = pow2(K)
    BV = min(64, pow2(V))
    BK = min(32, KP)
    prec = dot_precision(v.dtype)
    NC, N = table.NC, table.N
    G = chunk_common.alloc((Ttot, HV, K), torch.float32, dev)
    Araw = chunk_common.alloc((Ttot, HV, 64), torch.float32, dev)
    Aqk = chunk_common.alloc((Ttot, HV, 64), chunk_common.stored_dtype("aqk", v.dtype), dev)
    M = chunk_common.alloc((Ttot, HV, 64), torch.float32, dev)
    U = chunk_common.alloc((Ttot, HV, V), v.dtype, dev)
    Wk = chunk_common.alloc((Ttot, HV, K), v.dtype, dev)
    Qg = chunk_common.alloc((Ttot, HV, K), v.dtype, dev)
    Kd = chunk_common.alloc((Ttot, HV, K), v.dtype, dev)
    o = chunk_common.alloc((Ttot, HV, V), v.dtype, dev)
    ht = chunk_common.alloc((N, HV, K, V), torch.float32, dev) if output_final_state else None
    gate_raw = A_log is not None
    cs, cl = table.chunk_start, table.chunk_len
    BKC = min(int(LAUNCH["gate"].get("BK") or KP), KP)
    gate_args = (g, G, A_log if gate_raw else G, dt_bias if gate_raw else G, cs, cl)
    # base2 (no backward follows; launch table gate base2): G cumulated in units of log2, so that every
    # reader's decay is one exp2 of a difference (the backward reads G in natural units)
    base2 = not for_backward and bool(LAUNCH["gate"].get("base2"))
    # every chunk full (launch table chunks full): the per-chunk kernels place chunks from their index
    full = table.full and bool(LAUNCH["chunks"].get("full"))
    gate_flags = dict(HV=HV, K=K, BK=BKC, GATE_FROM_RAW=gate_raw, FLOOR=GATE_FLOOR, BASE2=base2, FULL=full)
    norms = {}
    # on_load (no backward follows): the norm applied by the kernels that read q / k, from the rstd alone,
    # so no normalised copy is written (a backward reads the copies: see LAUNCH's l2norm entry)
    on_load = qk_l2norm and not for_backward and bool(LAUNCH["l2norm"].get("on_load"))
    if qk_l2norm and not on_load and NC > 0 and same_shape_dtype(q, k) and LAUNCH["gate"].get("merge_l2norm"):
        # the gate's cumsum and the q / k norms in one launch
        (qn, rq), (kn, rk) = _l2norm_outputs((q, k))
        NKB = triton.cdiv(K, BKC)
        NL = triton.cdiv(Ttot * H, L2NORM_ROWS)
        _prologue_kernel[(NC * HV * NKB + 2 * NL,)](
            *gate_args, q.view(-1, K), qn.view(-1, K), rq, k.view(-1, K), kn.view(-1, K), rk, Ttot * H,
            NC * HV * NKB, NKB=NKB, D=K, DP=KP, BR=L2NORM_ROWS, **gate_flags, **launch("gate"))
        norms = dict(q=qn, k=kn, rq=rq, rk=rk)
    else:
        gate_done = False
        if on_load:
            rq, rk = (chunk_common.alloc((H, Ttot), torch.float32, dev) for _ in range(2))
            NT = triton.cdiv(Ttot, RSTD_ROWS)
            if NC > 0 and LAUNCH["gate"].get("merge_rstd"):  # (NC > 0 exactly when Ttot > 0)
                NKB = triton.cdiv(K, BKC)
                _rstd_prologue_kernel[(NC * HV * NKB + NT * H * 2,)](
                    *gate_args, q, k, rq, rk, Ttot, NC * HV * NKB, NKB=NKB, H=H, KP=KP, BT=RSTD_ROWS, **gate_flags,
                    **launch("gate"))
                gate_done = True
            elif Ttot > 0:
                _rstd_kernel[(NT, H, 2)](q, k, rq, rk, Ttot, H=H, K=K, KP=KP, BT=RSTD_ROWS)
            norms = dict(rq=rq, rk=rk)
        elif qk_l2norm:
            (qn, rq), (kn, rk) = l2norm_fwd(q, k)
            norms = dict(q=qn, k=kn, rq=rq, rk=rk)
        if NC > 0 and not gate_done:
            _gate_cumsum_kernel[(NC, HV, triton.cdiv(K, BKC))](*gate_args, **gate_flags, **launch("gate"))
    q, k = norms.get("q", q), norms.get("k", k)
    r_args = (norms["rq"], norms["rk"]) if on_load else (G, G)
    if NC > 0:
        fused_solve = bool(LAUNCH["gram_solve"].get("on"))
        if not fused_solve:
            BKG = min(int(LAUNCH["gram"].get("BK") or BK), KP)
            _gram_kernel[(NC * 4, HV)](q, k, G, Araw, Aqk, *r_args, cs, cl, Ttot, H=H, HV=HV, K=K, KP=KP, BK=BKG,
                                      PREC=prec, NORM=on_load, BASE2=base2, FULL=full, **launch("gram"))
        BH = min(int(LAUNCH["gram_diag"].get("BH") or 1), pow2(HV))  # value heads per program (a power of 2)
        _gram_diag_kernel[(NC * 64, triton.cdiv(HV, BH))](q, k, G, Araw, Aqk, *r_args, cs, cl, Ttot, H=H, HV=HV, K=K,
                                                         KP=KP, BH=BH, NORM=on_load, BASE2=base2,
                                                         FULL=full, FILL=bool(LAUNCH["gram_diag"].get("fill")),
                                                         **launch("gram_diag"))
        solve = LAUNCH["solve"]
        if fused_solve:  # the off-diagonal gram and the inverse in one launch, after the diagonal blocks
            # 16-wide key blocks where the programs are few (B1 T4K H16, 1024 programs: 0.046 ms against
            # 0.055 with 32; at 16K programs and more 32 is faster: 0.66 against 0.76 at B8 T4K H32)
            few = NC * HV <= int(LAUNCH["gram_solve"].get("few_programs") or 0)
            BKS = min(16 if few else int(LAUNCH["gram_solve"].get("BK") or BK), KP)
            _gram_solve_kernel[(NC, HV)](q, k, G, beta, Araw, Aqk, M, *r_args, cs, cl, Ttot, H=H, HV=HV, K=K, KP=KP,
                                         BK=BKS, PREC=prec, NORM=on_load, BETA_SIGMOID=beta_sigmoid,
                                         STORE_ARAW=for_backward, BASE2=base2, FULL=full, **launch("gram_solve"))
        else:
            _inverse_kernel[(NC, HV)](beta, Araw, M, cs, cl, HV=HV, BETA_SIGMOID=beta_sigmoid, PREC=prec,
                                      FULL=full, num_warps=int(solve.get("inverse_warps") or 1))
        BVV = min(int(solve.get("BV") or BV), pow2(max(K, V)))  # column block of the products
        NB = triton.cdiv(max(K, V), BVV)
        _wu_kernel[(NC * NB, HV)](q, k, v, beta, G, M, U, Wk, Qg, Kd, *r_args, cs, cl, Ttot, H=H, HV=HV, K=K, V=V, BV=BVV,
                                  NB=NB, BETA_SIGMOID=beta_sigmoid, PREC=prec, NORM=on_load, BASE2=base2,
                                  FULL=full, **launch("solve"))
    fused_output = False
    if N > 0:
        h0 = initial_state if initial_state is not None else G
        BVS, scan_kw = scan_launch("state_fwd", N * HV, V, KP, v.dtype, dev)
        # the output inside the scan pays where the scan has many programs (64-wide tiles: B8 T4K H32
        # fwd scan + output 1.28 -> 1.06 ms) and costs where it has few (B1 T64K H16: 1.94 -> 2.85 ms,
        # the serial path per program grows); H100, session 7, sweep_v11f
        cfg_out = LAUNCH["state_fwd"].get("output")
        fused_output = bool(cfg_out) if cfg_out is not None else (BVS == 64 and KP == 128 and v.dtype != torch.float32)
    # per-chunk states h and the scan's W: read by the output kernel (unless the scan makes o) and the backward
    store_saved = for_backward or not fused_output or not LAUNCH["state_fwd"].get("skip_saved")
    h = chunk_common.alloc((max(NC, 1), HV, K, V), v.dtype, dev) if store_saved else o
    W = chunk_common.alloc((Ttot, HV, V), v.dtype, dev) if store_saved else o
    if N > 0:
        _state_fwd_kernel[(triton.cdiv(V, BVS), N * HV)](
            Kd, G, U, Wk, W, h, h0, ht if ht is not None else G, Qg, Aqk, o, table.seq_start,
            table.chunk_first, scale, HV=HV, K=K, V=V, KP=KP, BV=BVS, HAS_INIT=initial_state is not None,
            STORE_FINAL=ht is not None, OUTPUT=fused_output, PREC=prec, STORE_SAVED=store_saved, BASE2=base2,
            **scan_kw)
    if NC > 0 and not fused_output:
        _output_kernel[(NC * triton.cdiv(V, BV), HV)](Qg, Aqk, W, h, o, cs, cl, scale, H=H, HV=HV, K=K, V=V,
                                                     KP=KP, BV=BV, PREC=prec, FULL=full, **launch("output"))
    if not for_backward:
        return o, ht, {}
    saved = dict(G=G, Araw=Araw, Aqk=Aqk, M=M, U=U, Wk=Wk, W=W, h=h, Qg=Qg, Kd=Kd, **norms)
    return o, ht, saved
