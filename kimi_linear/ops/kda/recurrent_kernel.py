"""Triton kernel for token-by-token KDA (decode and short inputs). Imported lazily (needs Triton).

One program owns one ``[K, BV]`` column tile of one (sequence, value head) state: it loads the
tile once (fp32), runs the recurrence of docs/kda.md step 1 over the sequence's tokens with the
tile in registers, writes each token's ``o[:, tile]`` and stores the tile back once. Decode (T=1)
is therefore one read and one write of the state, which is what bounds it; tiling over V gives
``N * HV * V / BV`` programs so that even small batches fill the GPU.

Column tiles are independent: the delta rule ``S <- S - beta k (k^T S) + beta k v^T`` and the output
``q^T S`` mix rows (the K axis) but never columns, so a tile needs only its own columns of S and v.

Launch grid: ``(cdiv(V, BV), N * HV)``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kimi_linear.ops.pdl import pdl_launch
from kimi_linear.ops.pdl_kernel import wait_for_previous_grid


@triton.jit
def _recurrent_kda_fwd_kernel(
    q,  # [B*T, H, K]
    k,  # [B*T, H, K]
    v,  # [B*T, HV, V]
    g,  # [B*T, HV, K] log-decay, or the raw gate projection when GATE_FROM_RAW
    beta,  # [B*T, HV] (logits when BETA_SIGMOID)
    o,  # [B*T, HV, V] output, dtype of v
    h0,  # [P, HV, K, V] fp32 initial states (P = N without slot indices)
    ht,  # [P, HV, K, V] fp32 final states (the same tensor as h0 for an in-place pool)
    cu_seqlens,  # [N+1] int, when IS_VARLEN
    state_indices,  # [N] int, when USE_INDICES
    A_log,  # [HV] fp32, when GATE_FROM_RAW
    dt_bias,  # [HV*K] fp32, when GATE_FROM_RAW
    scale,
    T,  # tokens per batch row (unused for varlen)
    P,  # slots in the state pool (range guard for USE_INDICES)
    H: tl.constexpr,
    HV: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    USE_INDICES: tl.constexpr,
    HAS_INIT: tl.constexpr,
    STORE_FINAL: tl.constexpr,
    QK_L2NORM: tl.constexpr,
    GATE_FROM_RAW: tl.constexpr,
    BETA_SIGMOID: tl.constexpr,
    PDL: tl.constexpr,
    TRIGGER: tl.constexpr = True,
):
    wait_for_previous_grid(PDL, TRIGGER)  # programmatic dependent launch (ops/pdl.py)
    i_v = tl.program_id(0)
    i_nh = tl.program_id(1)
    i_n = (i_nh // HV).to(tl.int64)
    i_hv = (i_nh % HV).to(tl.int64)
    i_h = i_hv // (HV // H)  # grouped value heads share a q/k head

    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        L = (tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos).to(tl.int32)
    else:
        bos = i_n * T
        L = T

    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    m_h = m_k[:, None] & m_v[None, :]
    # Offsets of this tile inside one [K, V] state.
    o_h = o_k[:, None].to(tl.int64) * V + o_v[None, :]

    if USE_INDICES:
        slot = tl.load(state_indices + i_n).to(tl.int64)
        # A negative slot marks a padding row: its state is neither read nor written and its
        # outputs are zero. Out-of-range slots (validated on the host when possible) are treated
        # the same way so that a bad index can never touch memory outside the pool.
        valid = (slot >= 0) & (slot < P)
        slot = tl.where(valid, slot, 0)
        m_s = m_h & valid
    else:
        slot = i_n
        valid = i_n >= 0  # always true; keeps one code path below
        m_s = m_h
    state_base = (slot * HV + i_hv) * K * V

    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_INIT:
        b_h += tl.load(h0 + state_base + o_h, mask=m_s, other=0.0).to(tl.float32)

    if GATE_FROM_RAW:
        # log-decay = -exp(A_log) * softplus(raw + dt_bias), docs/kda.md step 0.
        b_a = -tl.exp(tl.load(A_log + i_hv).to(tl.float32))
        b_bias = tl.load(dt_bias + i_hv * K + o_k, mask=m_k, other=0.0).to(tl.float32)

    p_q = q + (bos * H + i_h) * K + o_k
    p_k = k + (bos * H + i_h) * K + o_k
    p_v = v + (bos * HV + i_hv) * V + o_v
    p_g = g + (bos * HV + i_hv) * K + o_k
    p_beta = beta + bos * HV + i_hv
    p_o = o + (bos * HV + i_hv) * V + o_v

    for _ in range(0, L):
        b_q = tl.load(p_q, mask=m_k, other=0.0).to(tl.float32)
        b_k = tl.load(p_k, mask=m_k, other=0.0).to(tl.float32)
        b_v = tl.load(p_v, mask=m_v, other=0.0).to(tl.float32)
        b_g = tl.load(p_g, mask=m_k, other=0.0).to(tl.float32)
        b_beta = tl.load(p_beta).to(tl.float32)
        if QK_L2NORM:
            # eps inside the square root, as the reference l2norm (a zero vector stays zero)
            b_q = b_q * tl.rsqrt(tl.sum(b_q * b_q, axis=0) + 1e-6)
            b_k = b_k * tl.rsqrt(tl.sum(b_k * b_k, axis=0) + 1e-6)
        if GATE_FROM_RAW:
            x = b_g + b_bias
            # softplus with torch's threshold: identity above 20; exp's argument is clamped so the
            # branch not taken never forms inf.
            b_g = b_a * tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))))
            b_g = tl.where(m_k, b_g, 0.0)
        if BETA_SIGMOID:
            b_beta = tl.sigmoid(b_beta)
        # S' = Diag(exp(g)) S ; exp of a log-decay <= 0 lies in [0, 1] (g = -inf gives 0, no NaN)
        b_h = b_h * tl.exp(b_g)[:, None]
        # delta rule: w = beta (v - S'^T k) ; S = S' + k w^T
        b_w = b_beta * (b_v - tl.sum(b_h * b_k[:, None], axis=0))
        b_h = b_h + b_k[:, None] * b_w[None, :]
        b_o = tl.sum(b_h * b_q[:, None], axis=0) * scale
        b_o = tl.where(valid, b_o, 0.0)
        tl.store(p_o, b_o.to(p_o.dtype.element_ty), mask=m_v)

        p_q += H * K
        p_k += H * K
        p_v += HV * V
        p_g += HV * K
        p_beta += HV
        p_o += HV * V

    if STORE_FINAL:
        tl.store(ht + state_base + o_h, b_h, mask=m_s)


def default_tile(K: int, V: int) -> tuple[int, int]:
    """``(BV, num_warps)`` for the state tile ``[BK, BV]``.

    From the decode sweep in benchmarks/results/kda-decode_h100.md (H100, 32 heads, K = V = 128):
    BV=64 with 4 warps was the fastest tile at B = 64 and 256 (92% and 96% of copy bandwidth) and
    within 10% of the best at B = 1 and 16. The tile is capped at 8192 fp32 values (64 registers per
    thread at 4 warps) so that larger K does not spill.
    """
    BK = triton.next_power_of_2(K)
    BV = min(triton.next_power_of_2(V), 64, max(16, 8192 // BK))
    return BV, 4


def recurrent_kda_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float,
    h0: torch.Tensor | None,
    ht: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    state_indices: torch.Tensor | None,
    N: int,
    A_log: torch.Tensor | None,
    dt_bias: torch.Tensor | None,
    qk_l2norm: bool,
    beta_sigmoid: bool,
    BV: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """Launch the kernel on validated, contiguous inputs; returns ``o`` (``ht`` is written in place).

    ``h0``/``ht`` are ``[P, HV, K, V]`` fp32; with ``state_indices`` they are the same pool tensor.
    ``BV``/``num_warps`` override the tile choice (benchmark sweeps).
    """
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    o = torch.empty_like(v)
    if q.numel() == 0 and T == 0:
        return o
    BK = triton.next_power_of_2(K)
    bv, nw = default_tile(K, V)
    BV = BV or bv
    num_warps = num_warps or nw
    P = h0.shape[0] if h0 is not None else (ht.shape[0] if ht is not None else N)
    grid = (triton.cdiv(V, BV), N * HV)
    _recurrent_kda_fwd_kernel[grid](
        q, k, v, g, beta, o, h0, ht, cu_seqlens, state_indices, A_log, dt_bias,
        scale, T, P,
        H=H, HV=HV, K=K, V=V, BK=BK, BV=BV,
        IS_VARLEN=cu_seqlens is not None,
        USE_INDICES=state_indices is not None,
        HAS_INIT=h0 is not None,
        STORE_FINAL=ht is not None,
        QK_L2NORM=qk_l2norm,
        GATE_FROM_RAW=A_log is not None,
        BETA_SIGMOID=beta_sigmoid,
        num_warps=num_warps,
        **pdl_launch(q.device, "recurrent_kda"),
    )
    return o
