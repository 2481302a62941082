"""Decay-only linear attention (GLA / Mamba2-like, no delta rule), chunked and vectorised over chunks.

The recurrence (the same function as :func:`~kimi_linear.ops.kda.reference.chunk_decay_ref`):

    S_t = Diag(exp(g_t)) S_{t-1} + beta_t k_t v_t^T,        o_t = scale * S_t^T q_t

The reference walks the chunks in a Python loop (dozens of small kernels per chunk, forward and
backward), which makes the decay-only baseline of the synthetic tasks ~6-10x slower per step than
the Triton KDA kernel on a GPU. Without the delta rule no chunk's writes depend on the incoming
state, so every chunk can be done at once:

1. chunk-local cumulative log-decay ``Gamma`` (gates floored at ``GATE_FLOOR`` and summed in fp64,
   as in the reference);
2. intra-chunk attention ``A[t, i] = sum_c q_t[c] k_i[c] exp(Gamma_t[c] - Gamma_i[c])`` for
   ``i <= t`` with the pairwise ``[C, C, K]`` decay, masked *before* ``exp`` (no positive exponent);
3. each chunk's write to the state at its end, ``dS_j = (exp(Gamma_last - Gamma) k)^T (beta v)``;
4. the state entering chunk ``c`` for all chunks at once:
   ``S_in[c] = exp(E_c) S_0 + sum_{j<c} exp(E_c - P_j) dS_j`` with ``P`` the inclusive and ``E`` the
   exclusive cumulative sum of the chunks' total log-decays (a masked ``[n_chunks, n_chunks, K]``
   decay matrix, again masked before ``exp``);
5. ``o = scale * ((exp(Gamma) q) S_in + A (beta v))``.

Every exponent formed is ``<= 0``, so, like the reference, it is exact (up to rounding) and finite
for any gate. Cost: O(T C K) for step 2 and O((T / C)^2 K V) for step 4 per sequence and head, in a
fixed number of large tensor operations instead of a loop over chunks. Memory holds the
``[T / C, C, C, K]`` pairwise decays and the ``[T / C, T / C, K]`` chunk decays (about 1 GB in fp32
for 32 sequences x 2 heads x 2048 tokens, K = 128, C = 16).

Shapes and contract: as every KDA operator (``docs/kda.md``, :mod:`.contract`); ``beta`` optional
(default 1); ``cu_seqlens`` packs sequences along T (B == 1), each from its own initial state.
Arithmetic is fp32 for half/single inputs and fp64 for fp64 inputs; under autocast the matrix
products follow autocast, as the reference's do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kimi_linear.ops.kda.contract import check_kda_inputs, resolve_scale, sequence_spans
from kimi_linear.ops.kda.reference import GATE_FLOOR

__all__ = ["chunk_decay"]

DEFAULT_CHUNK_SIZE = 16


def _masked_exp(diff: torch.Tensor, keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``exp(diff)`` in ``dtype`` where ``keep``, exactly 0 elsewhere; the mask is applied before ``exp``.

    ``diff`` (fp64, a difference of two cumulative sums) is rounded to ``dtype`` only after the
    subtraction, so a small decay between two late tokens keeps its precision however large the
    cumulative sums are.
    """
    return torch.exp(diff.to(dtype).masked_fill_(~keep, float("-inf")))


def _decay_rows(q, k, v, g, beta, S0, scale: float, chunk_size: int):
    """Independent equal-length sequences, heads folded into rows.

    Shapes: ``q, k, g [R, T, K]``, ``v [R, T, V]``, ``beta [R, T]``, ``S0 [R, K, V]`` (all in the
    compute dtype). Returns ``o [R, T, V]`` and the final state ``[R, K, V]``.
    """
    R, T, K = q.shape
    V = v.shape[-1]
    C = chunk_size
    n = -(-T // C)
    pad = n * C - T
    if pad:  # trailing pads: no decay (g = 0), no write (k = v = beta = 0), outputs dropped
        q, k, g = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, g))
        v = F.pad(v, (0, 0, 0, pad))
        beta = F.pad(beta, (0, pad))
    dtype = q.dtype
    q, k, g = (x.view(R, n, C, K) for x in (q, k, g))
    v, beta = v.view(R, n, C, V), beta.view(R, n, C)

    # 1. chunk-local cumulative log-decay (<= 0, non-increasing), summed in fp64
    G64 = g.to(torch.float64).clamp(min=GATE_FLOOR).cumsum(dim=2)  # [R, n, C, K]

    # 2. intra-chunk attention with the pairwise decay exp(Gamma_t - Gamma_i), i <= t
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    D = _masked_exp(G64.unsqueeze(3) - G64.unsqueeze(2), causal[:, :, None], dtype)  # [R, n, t, i, K]
    A = torch.einsum("rntc,rnic,rntic->rnti", q, k, D)
    W = beta.unsqueeze(-1) * v  # the writes beta_i v_i  [R, n, C, V]

    # 3. each chunk's write to the state at its own end
    G_last = G64[:, :, -1]  # [R, n, K]
    k_to_end = k * torch.exp(G_last.unsqueeze(2) - G64).to(dtype)
    dS = k_to_end.transpose(-1, -2) @ W  # [R, n, K, V]

    # 4. the state entering every chunk: S_in[c] = exp(E_c) S0 + sum_{j<c} exp(E_c - P_j) dS_j
    P = G_last.cumsum(dim=1)  # decay from the start to the end of chunk j   [R, n, K]
    E = P - G_last  # ... to the start of chunk c
    before = torch.ones(n, n, dtype=torch.bool, device=q.device).tril(-1)
    M = _masked_exp(E.unsqueeze(2) - P.unsqueeze(1), before[:, :, None], dtype)  # [R, c, j, K]
    # contract j per (row, channel): [R, K, c, j] @ [R, K, j, V]
    S_in = (M.permute(0, 3, 1, 2) @ dS.permute(0, 2, 1, 3)).permute(0, 2, 1, 3)  # [R, n, K, V]
    S_in = S_in + torch.exp(E).to(dtype).unsqueeze(-1) * S0.unsqueeze(1)

    # 5. output: incoming state plus the chunk's own tokens
    o = scale * ((q * torch.exp(G64).to(dtype)) @ S_in + A @ W)  # [R, n, C, V]
    S_T = torch.exp(G_last[:, -1]).to(dtype).unsqueeze(-1) * S_in[:, -1] + dS[:, -1]
    return o.reshape(R, n * C, V)[:, :T], S_T


def chunk_decay(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Decay-only linear attention; same function and contract as ``chunk_decay_ref``.

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, HV, V]``; g: log-decay ``[B, T, HV, K]`` (<= 0);
        beta: ``[B, T, HV]`` or None (1); initial_state: ``[N, HV, K, V]`` fp32 (fp64 for fp64 inputs).
        scale: output scale (default ``K ** -0.5``).
        cu_seqlens: int ``[N+1]`` offsets of N packed sequences (B == 1).
        chunk_size: tokens per chunk (any value gives the same result; 16 keeps the pairwise decay
            tensor small).

    Returns:
        ``(o [B, T, HV, V] in v's dtype, final_state [N, HV, K, V] or None)``.
    """
    shape = check_kda_inputs(q, k, v, g, beta, initial_state=initial_state, cu_seqlens=cu_seqlens)
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    scale = resolve_scale(scale, shape.K)
    compute = torch.float64 if v.dtype == torch.float64 else torch.float32
    group = shape.HV // shape.H
    if beta is None:
        beta = torch.ones(q.shape[:2] + (shape.HV,), dtype=compute, device=v.device)

    def rows(x: torch.Tensor, qk: bool = False) -> torch.Tensor:
        """``[b, L, heads, ...]`` -> ``[b * HV, L, ...]`` in the compute dtype."""
        x = x.to(compute)
        if qk and group > 1:
            x = x.repeat_interleave(group, dim=2)
        return x.movedim(1, 2).flatten(0, 1)

    def state0(n0: int, n1: int) -> torch.Tensor:
        if initial_state is not None:
            return initial_state[n0:n1].to(compute).flatten(0, 1)
        return torch.zeros((n1 - n0) * shape.HV, shape.K, shape.V, dtype=compute, device=v.device)

    def run(b0: int, b1: int, s: int, e: int, n0: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch rows ``b0:b1`` over times ``s:e`` from states ``n0:n0 + (b1 - b0)``."""
        nb = b1 - b0
        S0 = state0(n0, n0 + nb)
        if e == s:
            return torch.zeros(nb, 0, shape.HV, shape.V, dtype=compute, device=v.device), S0.unflatten(0, (nb, shape.HV))
        sl = (slice(b0, b1), slice(s, e))
        o, S = _decay_rows(rows(q[sl], True), rows(k[sl], True), rows(v[sl]), rows(g[sl]), rows(beta[sl]), S0,
                           scale, chunk_size)
        return o.unflatten(0, (nb, shape.HV)).movedim(1, 2), S.unflatten(0, (nb, shape.HV))

    if cu_seqlens is None:
        o, S = run(0, shape.B, 0, shape.T, 0)
    else:
        pieces, finals = [], []
        for n, (_, s, e) in enumerate(sequence_spans(shape, cu_seqlens)):
            o_n, S_n = run(0, 1, s, e, n)
            pieces.append(o_n)
            finals.append(S_n[0])
        o, S = torch.cat(pieces, dim=1), torch.stack(finals)
    return o.to(v.dtype), (S.to(compute) if output_final_state else None)
