"""The inference forward of chunked KDA in one launch, the state kept on chip (imported lazily: Triton).

:func:`kimi_linear.ops.kda.chunk_fwd.chunk_kda_fwd` hands a forward that no backward follows
(inference, prefill) to :func:`chunk_kda_fwd_onchip` when the launch table's ``onchip`` entry is on
and the sequences x value heads fill the GPU (``chunk_common.LAUNCH["onchip"]``). One program per
(sequence, value head, V-tile of BV columns) walks its sequence in chunks of BT = 16 tokens and holds
its [K, BV] fp32 state in registers from the first chunk to the last: q, k, v, g and beta are read
once, o (and the final state) written once -- none of the multi-launch forward's intermediates (G,
Aqk, M, U, Wk, Qg, Kd, ~4 KB per (token, head)) reach memory. Per chunk, with ``G`` the chunk's
cumulated gate (every row <= 0 relative to the chunk's start) and ``S`` the state before it:

    Aqk[r, j] = sum_c q_rc k_jc e^{G_rc - G_jc}            (j <= r)
    A[r, j]   = beta_r sum_c k_rc k_jc e^{G_rc - G_jc}     (j < r)
    Delta     = (I + A)^-1 (beta V - (beta e^G K) S)       [BT, BV]  (the delta rule's corrected values)
    o         = scale ((e^G Q) S + Aqk Delta)
    S        <- e^{G_last} S + (e^{G_last - G} K)^T Delta

(docs/kda.md's chunked form at chunk size 16). Every exponent is a later cumulated gate minus an
earlier one, so <= 0: exact for any gate, with no reference token -- a 16-token chunk has no
off-diagonal sub-blocks to factor. ``I + A`` is unit lower triangular with ``A^16 = 0``, so its inverse
is ``(I - A)(I + A^2)(I + A^4)(I + A^8)``: six 16 x 16 products instead of a 16-step substitution, and
one Newton step after them (two more), since the product's terms cancel where A's entries are ~1.

Why 16 tokens: the chunk's quadratic part (pairs, inverse, Delta) costs O(BT) per token while the state
products cost O(K V) per token at any BT, so the smallest chunk tl.dot takes moves the fewest FLOPs;
the price is a longer serial chain per program, which only many programs (sequences x heads) hide.
Short of that (one long sequence) the multi-launch forward, whose stages are parallel over chunks,
stays (``min_rows``).

The pairwise decays are taken per key block of BK channels (the state's row blocks too), their
partial sums added; a block's gate is cumulated in units of log2 (one exp2 per decay). With the fused
l2 norm the rows' norms are applied as row / column scales of the products (they are bilinear in q, k).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kimi_linear.ops.kda import chunk_common
from kimi_linear.ops.kda.chunk_common import GATE_FLOOR, LAUNCH, pow2, sm_count
from kimi_linear.ops.kda.chunk_fwd import dot_precision, softplus_f32

BT = 16  # tokens per chunk (tl.dot's smallest side)
MAX_BLOCKS = 4  # key blocks of the state (S0 .. S3): K <= 4 * BK


def takes(N: int, HV: int, K: int, V: int, device: torch.device) -> bool:
    """Whether the forward of ``N`` sequences x ``HV`` value heads goes on chip (launch table ``onchip``:
    switched on, K within the kernel's blocks, at least ``min_rows`` sequences x value heads -- or, when
    that is None, at least one per SM)."""
    cfg = LAUNCH["onchip"]
    if not cfg.get("on") or K > MAX_BLOCKS * int(cfg.get("BK") or 32):
        return False
    rows = cfg.get("min_rows")
    return N * HV >= (int(rows) if rows is not None else sm_count(device))


@triton.jit
def _key_block(q, k, g, dt_bias, a_neg, rows, m_t, c0, i_h, i_hv, S,
               H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, BK: tl.constexpr,
               GATE_FROM_RAW: tl.constexpr, FLOOR: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr):
    """Key block ``c0 .. c0 + BK`` of one chunk against the state's rows ``S [BK, BV]`` (fp32):
    the block's share of the pair sums (q.k and k.k with their decays, [BT, BT]) and of the rows'
    squared norms, ``(e^G k) S`` and ``(e^G q) S`` [BT, BV] (raw q / k: the caller scales rows), the
    decayed keys of the state update ``e^{G_last - G} k`` [BT, BK] (in DT) and ``G_last`` [BK] (log2)."""
    o_c = c0 + tl.arange(0, BK)
    m_c = o_c < K
    m = m_t[:, None] & m_c[None, :]
    p = (rows[:, None] * H + i_h) * K + o_c[None, :]
    b_q = tl.load(q + p, mask=m, other=0).to(tl.float32)
    b_k = tl.load(k + p, mask=m, other=0).to(tl.float32)
    b_g = tl.load(g + (rows[:, None] * HV + i_hv) * K + o_c[None, :], mask=m, other=0).to(tl.float32)
    if GATE_FROM_RAW:
        b_b = tl.load(dt_bias + i_hv * K + o_c, mask=m_c, other=0).to(tl.float32)
        b_g = a_neg * softplus_f32(b_g + b_b[None, :])
    # rows past the sequence: gate 0, so G_last is the last real row's and they add nothing
    b_g = tl.where(m, tl.maximum(b_g, FLOOR), 0.0) * 1.4426950408889634
    b_G = tl.cumsum(b_g, axis=0)
    b_gl = tl.sum(b_g, axis=0)
    # pairs (r, j, c): 2^{G_rc - G_jc}, clamped at 1 where j > r (those entries are dropped by the caller)
    b_d = tl.math.exp2(tl.minimum(b_G[:, None, :] - b_G[None, :, :], 0.0))
    b_kj = b_k[None, :, :] * b_d
    qk = tl.sum(b_q[:, None, :] * b_kj, axis=2)
    kk = tl.sum(b_k[:, None, :] * b_kj, axis=2)
    b_e = tl.math.exp2(b_G)
    b_s = S.to(DT)
    ks = tl.dot((b_k * b_e).to(DT), b_s, input_precision=PREC)
    qs = tl.dot((b_q * b_e).to(DT), b_s, input_precision=PREC)
    b_kd = (b_k * tl.math.exp2(b_gl[None, :] - b_G)).to(DT)
    return qk, kk, tl.sum(b_q * b_q, axis=1), tl.sum(b_k * b_k, axis=1), ks, qs, b_kd, b_gl


@triton.jit
def _unit_lower_inverse(A, eye):
    """``(I + A)^-1`` of a strictly lower triangular [16, 16] ``A`` (fp32): ``(I - A)(I + A^2)(I + A^4)(I + A^8)``."""
    P = eye - A
    A2 = tl.dot(A, A, input_precision="ieee")
    P = tl.dot(P, eye + A2, input_precision="ieee")
    A4 = tl.dot(A2, A2, input_precision="ieee")
    P = tl.dot(P, eye + A4, input_precision="ieee")
    A8 = tl.dot(A4, A4, input_precision="ieee")
    P = tl.dot(P, eye + A8, input_precision="ieee")
    # one Newton step, P + P (I - (I + A) P): the product's terms cancel where A's entries are ~1 (nearly
    # equal keys, beta ~1), leaving ~1e-4 of relative error in fp32; the step squares that residual
    R = eye - P - tl.dot(A, P, input_precision="ieee")
    return P + tl.dot(P, R, input_precision="ieee")


@triton.jit
def _state_rows(h0, i_n, i_hv, b, o_v, m_v, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr):
    """Pointers and mask of the state's key block ``b`` [BK, BV] of (sequence, value head) in ``[N, HV, K, V]``."""
    o_k = b * BK + tl.arange(0, BK)
    return h0 + ((i_n.to(tl.int64) * HV + i_hv) * K + o_k[:, None]) * V + o_v[None, :], (o_k < K)[:, None] & m_v[None, :]


@triton.jit
def _onchip_fwd_kernel(q, k, v, g, beta, A_log, dt_bias, h0, ht, o, seq_start, scale,
                       H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                       BK: tl.constexpr, NKB: tl.constexpr, BV: tl.constexpr,
                       GATE_FROM_RAW: tl.constexpr, BETA_SIGMOID: tl.constexpr, NORM: tl.constexpr,
                       HAS_INIT: tl.constexpr, STORE_FINAL: tl.constexpr, FLOOR: tl.constexpr,
                       PREC: tl.constexpr):
    # grid (V / BV, N * HV); q, k [Ttot, H, K], v [Ttot, HV, V], g [Ttot, HV, K], beta [Ttot, HV],
    # o [Ttot, HV, V], h0 / ht [N, HV, K, V] fp32. Module docstring for the algorithm.
    DT: tl.constexpr = v.dtype.element_ty  # the state products' operand type
    i_v = tl.program_id(0)
    i_nh = tl.program_id(1)
    i_n = i_nh // HV
    i_hv = (i_nh % HV).to(tl.int64)
    i_h = i_hv // (HV // H)
    bos = tl.load(seq_start + i_n).to(tl.int64)
    eos = tl.load(seq_start + i_n + 1).to(tl.int64)
    o_t = tl.arange(0, 16)
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    eye = tl.where(o_t[:, None] == o_t[None, :], 1.0, 0.0)
    a_neg = 0.0
    if GATE_FROM_RAW:
        a_neg = -tl.exp(tl.load(A_log + i_hv).to(tl.float32))
    p0, m0 = _state_rows(h0, i_n, i_hv, 0, o_v, m_v, HV, K, V, BK)
    S0 = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_INIT:
        S0 = tl.load(p0, mask=m0, other=0)
    if NKB >= 2:
        p1, m1 = _state_rows(h0, i_n, i_hv, 1, o_v, m_v, HV, K, V, BK)
        S1 = tl.zeros([BK, BV], dtype=tl.float32)
        if HAS_INIT:
            S1 = tl.load(p1, mask=m1, other=0)
    if NKB >= 3:
        p2, m2 = _state_rows(h0, i_n, i_hv, 2, o_v, m_v, HV, K, V, BK)
        S2 = tl.zeros([BK, BV], dtype=tl.float32)
        if HAS_INIT:
            S2 = tl.load(p2, mask=m2, other=0)
    if NKB >= 4:
        p3, m3 = _state_rows(h0, i_n, i_hv, 3, o_v, m_v, HV, K, V, BK)
        S3 = tl.zeros([BK, BV], dtype=tl.float32)
        if HAS_INIT:
            S3 = tl.load(p3, mask=m3, other=0)
    for t0 in range(bos, eos, 16):
        rows = t0 + o_t
        m_t = rows < eos
        qk, kk, sq, sk, ks, qs, kd0, gl0 = _key_block(q, k, g, dt_bias, a_neg, rows, m_t, 0, i_h, i_hv, S0, H, HV, K,
                                                      BK, GATE_FROM_RAW, FLOOR, DT, PREC)
        if NKB >= 2:
            qk1, kk1, sq1, sk1, ks1, qs1, kd1, gl1 = _key_block(q, k, g, dt_bias, a_neg, rows, m_t, BK, i_h, i_hv, S1, H,
                                                                HV, K, BK, GATE_FROM_RAW, FLOOR, DT, PREC)
            qk, kk, sq, sk, ks, qs = qk + qk1, kk + kk1, sq + sq1, sk + sk1, ks + ks1, qs + qs1
        if NKB >= 3:
            qk2, kk2, sq2, sk2, ks2, qs2, kd2, gl2 = _key_block(q, k, g, dt_bias, a_neg, rows, m_t, 2 * BK, i_h, i_hv,
                                                                S2, H, HV, K, BK, GATE_FROM_RAW, FLOOR, DT, PREC)
            qk, kk, sq, sk, ks, qs = qk + qk2, kk + kk2, sq + sq2, sk + sk2, ks + ks2, qs + qs2
        if NKB >= 4:
            qk3, kk3, sq3, sk3, ks3, qs3, kd3, gl3 = _key_block(q, k, g, dt_bias, a_neg, rows, m_t, 3 * BK, i_h, i_hv,
                                                                S3, H, HV, K, BK, GATE_FROM_RAW, FLOOR, DT, PREC)
            qk, kk, sq, sk, ks, qs = qk + qk3, kk + kk3, sq + sq3, sk + sk3, ks + ks3, qs + qs3
        b_beta = tl.load(beta + rows * HV + i_hv, mask=m_t, other=0).to(tl.float32)
        if BETA_SIGMOID:
            b_beta = tl.where(m_t, tl.sigmoid(b_beta), 0.0)
        if NORM:  # the fused l2 norm as row (and column) scales: y = x / sqrt(sum x^2 + 1e-6)
            rq = tl.rsqrt(sq + 1e-6)
            rk = tl.rsqrt(sk + 1e-6)
        else:
            rq = tl.full([16], 1.0, dtype=tl.float32)
            rk = tl.full([16], 1.0, dtype=tl.float32)
        A = tl.where(o_t[None, :] < o_t[:, None], (b_beta * rk)[:, None] * kk * rk[None, :], 0.0)
        Aqk = tl.where(o_t[None, :] <= o_t[:, None], rq[:, None] * qk * rk[None, :], 0.0)
        b_v = tl.load(v + (rows[:, None] * HV + i_hv) * V + o_v[None, :], mask=m_t[:, None] & m_v[None, :],
                      other=0).to(tl.float32)
        X = b_beta[:, None] * (b_v - rk[:, None] * ks)
        delta = tl.dot(_unit_lower_inverse(A, eye), X, input_precision=PREC)
        b_o = rq[:, None] * qs + tl.dot(Aqk, delta, input_precision=PREC)
        tl.store(o + (rows[:, None] * HV + i_hv) * V + o_v[None, :], (scale * b_o).to(o.dtype.element_ty),
                 mask=m_t[:, None] & m_v[None, :])
        d_k = (rk[:, None] * delta).to(DT)  # the keys' norm moved onto Delta's rows
        S0 = S0 * tl.math.exp2(gl0)[:, None] + tl.dot(tl.trans(kd0), d_k, input_precision=PREC)
        if NKB >= 2:
            S1 = S1 * tl.math.exp2(gl1)[:, None] + tl.dot(tl.trans(kd1), d_k, input_precision=PREC)
        if NKB >= 3:
            S2 = S2 * tl.math.exp2(gl2)[:, None] + tl.dot(tl.trans(kd2), d_k, input_precision=PREC)
        if NKB >= 4:
            S3 = S3 * tl.math.exp2(gl3)[:, None] + tl.dot(tl.trans(kd3), d_k, input_precision=PREC)
    if STORE_FINAL:
        f0, _ = _state_rows(ht, i_n, i_hv, 0, o_v, m_v, HV, K, V, BK)
        tl.store(f0, S0, mask=m0)
        if NKB >= 2:
            f1, _ = _state_rows(ht, i_n, i_hv, 1, o_v, m_v, HV, K, V, BK)
            tl.store(f1, S1, mask=m1)
        if NKB >= 3:
            f2, _ = _state_rows(ht, i_n, i_hv, 2, o_v, m_v, HV, K, V, BK)
            tl.store(f2, S2, mask=m2)
        if NKB >= 4:
            f3, _ = _state_rows(ht, i_n, i_hv, 3, o_v, m_v, HV, K, V, BK)
            tl.store(f3, S3, mask=m3)


def chunk_kda_fwd_onchip(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
    *, scale: float, initial_state: torch.Tensor | None, output_final_state: bool, seq_start: torch.Tensor,
    N: int, A_log: torch.Tensor | None, dt_bias: torch.Tensor | None, beta_sigmoid: bool, qk_l2norm: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The forward with no backward to follow, in one launch. Inputs as :func:`chunk_fwd.chunk_kda_fwd`'s
    (packed ``[Ttot, H|HV, ...]``, contiguous; ``seq_start [N + 1]`` the sequences' first tokens);
    returns ``o [Ttot, HV, V]`` (v's dtype) and the final states ``[N, HV, K, V]`` fp32 (or None)."""
    Ttot, H, K = q.shape
    HV, V = v.shape[1], v.shape[2]
    cfg = LAUNCH["onchip"]
    BK = min(int(cfg.get("BK") or 32), pow2(K))
    NKB = triton.cdiv(K, BK)
    if NKB > MAX_BLOCKS:
        raise ValueError(f"the on-chip forward takes K <= {MAX_BLOCKS * BK}, got K={K}")
    BV = min(int(cfg.get("BV") or 128), pow2(V))
    o = chunk_common.alloc((Ttot, HV, V), v.dtype, q.device)
    ht = chunk_common.alloc((N, HV, K, V), torch.float32, q.device) if output_final_state else None
    gate_raw = A_log is not None
    if N == 0 or Ttot == 0:
        if ht is not None:
            ht.copy_(initial_state if initial_state is not None else torch.zeros_like(ht))
        return o, ht
    kw = {"num_warps": int(cfg.get("num_warps") or 4)}
    if cfg.get("num_stages"):
        kw["num_stages"] = int(cfg["num_stages"])
    _onchip_fwd_kernel[(triton.cdiv(V, BV), N * HV)](
        q, k, v, g, beta, A_log if gate_raw else g, dt_bias if gate_raw else g,
        initial_state if initial_state is not None else o, ht if ht is not None else o, o, seq_start, float(scale),
        H=H, HV=HV, K=K, V=V, BK=BK, NKB=NKB, BV=BV, GATE_FROM_RAW=gate_raw, BETA_SIGMOID=beta_sigmoid,
        NORM=qk_l2norm, HAS_INIT=initial_state is not None, STORE_FINAL=ht is not None, FLOOR=GATE_FLOOR,
        PREC=dot_precision(v.dtype), **kw)
    return o, ht
