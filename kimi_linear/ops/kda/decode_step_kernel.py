"""Triton kernel for one KDA layer's decode step after its input projections; imported lazily.

One program owns one column tile ``[K, BV]`` of one (sequence, value head) state (docs/kda.md: the
delta rule mixes rows, never columns) and does, for one token:

1. the gate's low-rank up-projection for its head (``f_b``: all ``K`` rows times ``f_a``), rounded to
   the activations' dtype as the unfused ``F.linear`` output is, then ``-exp(A_log) softplus(. +
   dt_bias)``;
2. the recurrence of docs/kda.md step 1 on its tile (L2-normalised q/k, sigmoid beta), the state
   updated in place in the pool slot (negative slot: padding, state untouched, output zero);
3. its outputs rounded to the activations' dtype (as the unfused recurrent kernel stores them),
   times the norm weight and ``sigmoid(g_b g_a)`` for its columns (the output gate's up-projection,
   rounded like 1.). The RMSNorm over the head's V outputs needs every tile: the program of a head
   that finishes last (a counter per head) scales the whole head by ``rsqrt(mean(o^2) + eps)``.

It replaces three launches of the unfused step (both up-projections, the recurrent kernel on V
tiles, the gated norm). Every load is issued before the first product so that the state, the
up-projection weights and the token's vectors are in flight together.

Launch grid: ``(N * HV, cdiv(V, BV))``.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
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
    scratch,  # [N, HV, V] fp32: gated, un-normalised outputs (NT > 1)
    sumsq,  # [N, HV, NT] fp32: each tile's sum of o^2 (NT > 1)
    counter,  # [N * HV] int32, zero between calls: tiles done per head (NT > 1)
    S_Q, S_K, S_V, S_FA, S_GA, S_B,
    scale, eps, P,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    RF: tl.constexpr, RG: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BRF: tl.constexpr, BRG: tl.constexpr,
    NT: tl.constexpr, NTP: tl.constexpr, BVA: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_for_previous_grid(PDL)  # programmatic dependent launch (ops/pdl.py)
    i_nh = tl.program_id(0)
    i_t = tl.program_id(1)  # V tile
    i_n = (i_nh // HV).to(tl.int64)
    i_hv = (i_nh % HV).to(tl.int64)
    i_h = i_hv // (HV // H)  # grouped value heads share a q/k head
    dt = y.dtype.element_ty

    o_k = tl.arange(0, BK)
    o_v = i_t * BV + tl.arange(0, BV)
    o_rf = tl.arange(0, BRF)
    o_rg = tl.arange(0, BRG)
    m_k, m_v, m_rf, m_rg = o_k < K, o_v < V, o_rf < RF, o_rg < RG
    m_h = m_k[:, None] & m_v[None, :]

    slot = tl.load(state_indices + i_n).to(tl.int64)
    valid = (slot >= 0) & (slot < P)  # out of range (unchecked on the GPU) is treated as padding
    slot = tl.where(valid, slot, 0)
    p_h = pool + (slot * HV + i_hv) * K * V + o_k[:, None].to(tl.int64) * V + o_v[None, :]

    # every load first: the state tile, the gate's whole up-projection rows for this head (every tile
    # needs all K decays), the output gate's rows for this tile, the token's vectors
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
    b_og = b_o * b_nw * tl.sigmoid(gate)
    p_y = y + i_n * (HV * V) + i_hv * V
    if NT == 1:
        tl.store(p_y + o_v, (b_og * tl.rsqrt(tl.sum(b_o * b_o, axis=0) / V + eps)).to(dt), mask=m_v)
    else:
        # the norm needs every tile's o: each tile leaves its gated outputs and sum of squares, and the
        # head's counter (atomic, acq_rel, after a barrier: all threads' stores first) names the program
        # that finishes last, which scales the whole head (sums in tile order: deterministic) and
        # resets the counter for the next call. No program waits for another.
        i_row = i_n * HV + i_hv
        tl.store(scratch + i_row * V + o_v, b_og, mask=m_v)
        tl.store(sumsq + i_row * NT + i_t, tl.sum(b_o * b_o, axis=0))
        tl.debug_barrier()
        done = tl.atomic_add(counter + i_row, 1, sem="acq_rel")
        if done == NT - 1:
            o_all = tl.arange(0, BVA)
            o_t = tl.arange(0, NTP)
            # L2 reads (".cg"): the other tiles' values never passed through this SM's L1
            b_ss = tl.load(sumsq + i_row * NT + o_t, mask=o_t < NT, other=0.0, cache_modifier=".cg")
            rstd = tl.rsqrt(tl.sum(b_ss, axis=0) / V + eps)
            b_all = tl.load(scratch + i_row * V + o_all, mask=o_all < V, other=0.0, cache_modifier=".cg")
            tl.store(p_y + o_all, (b_all * rstd).to(dt), mask=o_all < V)
            tl.atomic_xchg(counter + i_row, 0)


# Launch settings by batch rows (N), from benchmarks/kda_decode_step_sweep.py on an H100 (32 heads of
# 128): filled in below from the measurement.
TILE = dict(BV=32, num_warps=4)

_COUNTERS: OrderedDict[tuple, torch.Tensor] = OrderedDict()  # per state pool: bounded (LRU)
_COUNTERS_MAX = 1024


def _counters(pool: torch.Tensor, rows: int) -> torch.Tensor | None:
    """Per-head counters (int32 zeros, left at zero by every call) for the pool's calls, or None while
    a CUDA graph is being captured and none exist yet (a zero fill captured into the graph would not
    run before the eager calls after it): the caller then launches one program per head. One set per
    pool (one per layer), so two layers never share counters; a layer's calls run in order."""
    key = (pool.device, pool.data_ptr())
    cnt = _COUNTERS.get(key)
    if cnt is None or cnt.numel() < rows:
        if pool.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        cnt = torch.zeros(max(rows, 64), dtype=torch.int32, device=pool.device)
        _COUNTERS[key] = cnt
        while len(_COUNTERS) > _COUNTERS_MAX:
            _COUNTERS.popitem(last=False)
    _COUNTERS.move_to_end(key)
    return cnt


def kda_decode_step_fwd(q, k, v, f_a, g_a, beta, y, pool, state_indices, w_fb, w_gb, w_norm, A_log, dt_bias, *,
                        N: int, H: int, HV: int, K: int, V: int, scale: float, eps: float,
                        BV: int | None = None, num_warps: int | None = None) -> None:
    """Launch on validated inputs (row-strided activations with unit column stride, contiguous
    weights, pool and output); writes ``y`` and the pool in place. ``BV`` (a power of two) splits each
    head's state into ``cdiv(V, BV)`` column tiles, one program each; ``BV >= V``: one program per head."""
    BVA = triton.next_power_of_2(V)
    BV = min(BV or TILE["BV"], BVA)
    NT = triton.cdiv(V, BV)
    counter = _counters(pool, N * HV) if NT > 1 else None
    if counter is None:  # one program per head (also while capturing before the counters exist)
        BV, NT, counter = BVA, 1, y
    warps = num_warps or (TILE["num_warps"] if NT > 1 else max(4, min(16, BVA * triton.next_power_of_2(K) // 2048)))
    scratch = torch.empty((N * HV * V,), dtype=torch.float32, device=q.device) if NT > 1 else y
    sumsq = torch.empty((N * HV * NT,), dtype=torch.float32, device=q.device) if NT > 1 else y
    _kda_decode_step_kernel[(N * HV, NT)](
        q, k, v, f_a, g_a, beta, y, pool, state_indices, w_fb, w_gb, w_norm, A_log, dt_bias, scratch, sumsq, counter,
        q.stride(0), k.stride(0), v.stride(0), f_a.stride(0), g_a.stride(0), beta.stride(0),
        scale, eps, pool.shape[0],
        H=H, HV=HV, K=K, V=V, RF=f_a.shape[1], RG=g_a.shape[1],
        BK=triton.next_power_of_2(K), BV=BV,
        BRF=triton.next_power_of_2(f_a.shape[1]), BRG=triton.next_power_of_2(g_a.shape[1]),
        NT=NT, NTP=triton.next_power_of_2(NT), BVA=BVA,
        num_warps=warps,
        **pdl_launch(q.device),
    )
