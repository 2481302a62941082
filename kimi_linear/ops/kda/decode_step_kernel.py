"""Triton kernel for one KDA layer's decode step after its input projections; imported lazily.

One program owns one (sequence, value head) and the head's whole ``[K, V]`` fp32 state, so that the
per-head RMSNorm of the output, which needs all V columns, happens in the same program:

1. the gate's low-rank up-projection for this head (``f_b``: ``[K, R]`` rows times ``f_a``), rounded
   to the activations' dtype as the unfused ``F.linear`` output is, then ``-exp(A_log) softplus(. +
   dt_bias)``;
2. the recurrence of docs/kda.md step 1 for one token (L2-normalised q/k, sigmoid beta), the state
   updated in place in the pool slot (negative slot: padding, state untouched, output zero);
3. the output rounded to the activations' dtype (as the unfused recurrent kernel stores it), RMS-
   normalised over V in fp32, times the norm weight and ``sigmoid(g_b g_a)`` (the output gate's
   up-projection, rounded like 1.), cast back.

It replaces three launches of the unfused step (both up-projections, the recurrent kernel on V
tiles, the gated norm). Every load is issued before the first product so that the state, the two
up-projection weights and the token's vectors are in flight together.

Launch grid: ``(N * HV,)``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kimi_linear.ops.pdl import pdl_launch
from kimi_linear.ops.pdl_kernel import wait_for_previous_grid


@triton.jit
def _softplus(x):
    # torch's threshold: identity above 20; exp's argument clamped so the branch not taken never forms inf
    return tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))))


@triton.jit
def _kda_decode_step_kernel(
    q, k, v,  # [N, H*K], [N, H*K], [N, HV*V] (rows S_Q, S_K, S_V apart)
    f_a, g_a,  # [N, RF], [N, RG] gate / output-gate low-rank inputs (rows S_FA, S_GA apart)
    beta,  # [N, HV] logits (rows S_B apart)
    y,  # [N, HV*V] output (contiguous), the activations' dtype
    pool,  # [P, HV, K, V] fp32 states, updated in place
    state_indices,  # [N] int slot per sequence, < 0 = padding
    w_fb,  # [HV*K, RF] gate up-projection
    w_gb,  # [HV*V, RG] output-gate up-projection
    w_norm,  # [V] RMSNorm weight
    A_log,  # [HV] fp32
    dt_bias,  # [HV*K] fp32
    S_Q, S_K, S_V, S_FA, S_GA, S_B,
    scale, eps, P,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    RF: tl.constexpr, RG: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BRF: tl.constexpr, BRG: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_for_previous_grid(PDL)  # programmatic dependent launch (ops/pdl.py)
    i_nh = tl.program_id(0)
    i_n = (i_nh // HV).to(tl.int64)
    i_hv = (i_nh % HV).to(tl.int64)
    i_h = i_hv // (HV // H)  # grouped value heads share a q/k head
    dt = y.dtype.element_ty

    o_k = tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    o_rf = tl.arange(0, BRF)
    o_rg = tl.arange(0, BRG)
    m_k, m_v, m_rf, m_rg = o_k < K, o_v < V, o_rf < RF, o_rg < RG
    m_h = m_k[:, None] & m_v[None, :]

    slot = tl.load(state_indices + i_n).to(tl.int64)
    valid = (slot >= 0) & (slot < P)  # out of range (unchecked on the GPU) is treated as padding
    slot = tl.where(valid, slot, 0)
    p_h = pool + (slot * HV + i_hv) * K * V + o_k[:, None].to(tl.int64) * V + o_v[None, :]

    # every load first: state, both up-projection weight tiles, the token's vectors
    b_h = tl.load(p_h, mask=m_h & valid, other=0.0)
    b_wf = tl.load(w_fb + (i_hv * K + o_k[:, None]) * RF + o_rf[None, :], mask=m_k[:, None] & m_rf[None, :], other=0.0)
    b_wg = tl.load(w_gb + (i_hv * V + o_v[:, None]) * RG + o_rg[None, :], mask=m_v[:, None] & m_rg[None, :], other=0.0)
    b_fa = tl.load(f_a + i_n * S_FA + o_rf, mask=m_rf, other=0.0).to(tl.float32)
    b_ga = tl.load(g_a + i_n * S_GA + o_rg, mask=m_rg, other=0.0).to(tl.float32)
    b_q = tl.load(q + i_n * S_Q + i_h * K + o_k, mask=m_k, other=0.0).to(tl.float32)
    b_k = tl.load(k + i_n * S_K + i_h * K + o_k, mask=m_k, other=0.0).to(tl.float32)
    b_v = tl.load(v + i_n * S_V + i_hv * V + o_v, mask=m_v, other=0.0).to(tl.float32)
    b_beta = tl.sigmoid(tl.load(beta + i_n * S_B + i_hv).to(tl.float32))
    b_a = -tl.exp(tl.load(A_log + i_hv).to(tl.float32))
    b_bias = tl.load(dt_bias + i_hv * K + o_k, mask=m_k, other=0.0).to(tl.float32)
    b_nw = tl.load(w_norm + o_v, mask=m_v, other=0.0).to(tl.float32)

    # 1. log-decay from the raw gate (rounded as F.linear's output), docs/kda.md step 0
    g_raw = tl.sum(b_wf.to(tl.float32) * b_fa[None, :], axis=1).to(dt).to(tl.float32)
    b_g = tl.where(m_k, b_a * _softplus(g_raw + b_bias), 0.0)
    # 2. one recurrence step: S' = Diag(exp(g)) S ; w = beta (v - S'^T k) ; S = S' + k w^T ; o = scale S^T q
    b_q = b_q * tl.rsqrt(tl.sum(b_q * b_q, axis=0) + 1e-6)  # eps inside the root, as the reference l2norm
    b_k = b_k * tl.rsqrt(tl.sum(b_k * b_k, axis=0) + 1e-6)
    b_h = b_h * tl.exp(b_g)[:, None]
    b_w = b_beta * (b_v - tl.sum(b_h * b_k[:, None], axis=0))
    b_h = b_h + b_k[:, None] * b_w[None, :]
    tl.store(p_h, b_h, mask=m_h & valid)
    b_o = tl.sum(b_h * b_q[:, None], axis=0) * scale
    b_o = tl.where(valid & m_v, b_o, 0.0).to(dt).to(tl.float32)  # as the unfused kernel stores it
    # 3. gated RMSNorm over the head's V outputs, fp32 (the output gate rounded as F.linear's output)
    gate = tl.sum(b_wg.to(tl.float32) * b_ga[None, :], axis=1).to(dt).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(b_o * b_o, axis=0) / V + eps)
    b_y = b_o * rstd * b_nw * tl.sigmoid(gate)
    tl.store(y + i_n * (HV * V) + i_hv * V + o_v, b_y.to(dt), mask=m_v)


def default_warps(K: int, V: int) -> int:
    """Warps for one program holding a ``[K, V]`` fp32 state (128 x 128: 8 warps, 64 registers of
    state per thread)."""
    return max(1, min(16, triton.next_power_of_2(K) * triton.next_power_of_2(V) // 2048))


def kda_decode_step_fwd(q, k, v, f_a, g_a, beta, y, pool, state_indices, w_fb, w_gb, w_norm, A_log, dt_bias, *,
                        N: int, H: int, HV: int, K: int, V: int, scale: float, eps: float,
                        num_warps: int | None = None) -> None:
    """Launch on validated inputs (row-strided activations with unit column stride, contiguous
    weights, pool and output); writes ``y`` and the pool in place."""
    _kda_decode_step_kernel[(N * HV,)](
        q, k, v, f_a, g_a, beta, y, pool, state_indices, w_fb, w_gb, w_norm, A_log, dt_bias,
        q.stride(0), k.stride(0), v.stride(0), f_a.stride(0), g_a.stride(0), beta.stride(0),
        scale, eps, pool.shape[0],
        H=H, HV=HV, K=K, V=V, RF=f_a.shape[1], RG=g_a.shape[1],
        BK=triton.next_power_of_2(K), BV=triton.next_power_of_2(V),
        BRF=triton.next_power_of_2(f_a.shape[1]), BRG=triton.next_power_of_2(g_a.shape[1]),
        num_warps=num_warps or default_warps(K, V),
        **pdl_launch(q.device),
    )
