"""Reference KDA operators in plain PyTorch: the truth every kernel is tested against.

Two algorithms for one function (docs/kda.md):

* :func:`recurrent_kda_ref` -- the recurrence itself, token by token (docs/kda.md, step 1):
  ``S_t = (I - beta_t k_t k_t^T) Diag(exp(g_t)) S_{t-1} + beta_t k_t v_t^T``, ``o_t = scale * S_t^T q_t``.
* :func:`chunk_kda_ref` -- the paper's chunkwise form (steps 2-7): cumulative log-decays inside a
  chunk, the UT transform ``(I + A)^-1`` that turns the chunk's sequential delta-rule writes into
  matrix products, the output from the incoming state plus intra-chunk attention, and the state
  handed to the next chunk. Every exponent it forms is ``<= 0``, so it is exact and finite for any
  gate down to ``-inf`` in the limit.

Baselines share the machinery (no second copy of either algorithm):

* Gated DeltaNet (one decay per head): :func:`recurrent_gdn_ref`, :func:`chunk_gdn_ref`.
* Decay-only (GLA / Mamba2-like, no delta rule: ``S_t = Diag(exp(g_t)) S_{t-1} + beta_t k_t v_t^T``):
  :func:`recurrent_decay_ref`, :func:`chunk_decay_ref` (beta optional, default 1).

| tensor        | shape             | notes                                           |
|---------------|-------------------|-------------------------------------------------|
| q, k          | ``[B, T, H, K]``  | value head ``hv`` reads q/k head ``hv // (HV // H)`` |
| v             | ``[B, T, HV, V]`` | HV % H == 0 (grouped value heads)               |
| g             | ``[B, T, HV, K]`` | log-decay, <= 0 (``[B, T, HV]`` for GDN)        |
| beta          | ``[B, T, HV]``    | write strength in [0, 1]                        |
| initial_state | ``[N, HV, K, V]`` | float32 (float64 for fp64 inputs)               |
| o             | ``[B, T, HV, V]`` | dtype of v                                      |
| final_state   | ``[N, HV, K, V]`` | float32 (float64 for fp64 inputs)               |

With ``cu_seqlens`` (int ``[N+1]``, B == 1) the T axis packs N sequences; each starts from its own
initial state (zero when none is given) and chunks never cross sequence boundaries.
Arithmetic is fp32 for half/single inputs and fp64 for fp64 inputs.
"""

from __future__ import annotations

import torch

from kimi_linear.ops.kda.contract import check_kda_inputs, resolve_scale, sequence_spans
from kimi_linear.ops.kda.fusion import KDAFusion, apply_fusion_ref

# A log-decay at or below this makes exp() exactly 0 in fp32 and fp64 (e^-745 underflows fp64), so
# flooring gates here changes no result while keeping chunk cumsums small enough to stay precise.
GATE_FLOOR = -800.0

__all__ = [
    "recurrent_kda_ref",
    "chunk_kda_ref",
    "recurrent_gdn_ref",
    "chunk_gdn_ref",
    "recurrent_decay_ref",
    "chunk_decay_ref",
]


# ----------------------------------------------------------------------------------------------
# One sequence, heads first. Shapes inside: q, k, g [HV, L, K]; v [HV, L, V]; beta [HV, L]; S [HV, K, V]
# ----------------------------------------------------------------------------------------------


def _recurrent_sequence(q, k, v, g, beta, S, scale: float, delta_rule: bool):
    """Token-by-token recurrence over one sequence (docs/kda.md, step 1). Returns ``o [HV, L, V]``, ``S``."""
    outs = []
    for t in range(q.shape[1]):
        S = S * torch.exp(g[:, t]).unsqueeze(-1)  # Diag(exp(g_t)) S_{t-1}
        k_t = k[:, t]
        if delta_rule:
            # w_t = beta_t (v_t - S'^T k_t): the error of the decayed memory's prediction for k_t.
            w_t = beta[:, t, None] * (v[:, t] - torch.einsum("hk,hkv->hv", k_t, S))
        else:
            w_t = beta[:, t, None] * v[:, t]
        S = S + k_t.unsqueeze(-1) * w_t.unsqueeze(-2)
        outs.append(scale * torch.einsum("hk,hkv->hv", q[:, t], S))
    o = torch.stack(outs, dim=1) if outs else v.new_zeros(v.shape)
    return o, S


def _chunk_sequence(q, k, v, g, beta, S, scale: float, delta_rule: bool, chunk_size: int):
    """Chunkwise form over one sequence (docs/kda.md, steps 2-7). Returns ``o [HV, L, V]``, ``S``."""
    L = q.shape[1]
    outs = []
    for c0 in range(0, L, chunk_size):
        c1 = min(c0 + chunk_size, L)
        n = c1 - c0
        qc, kc, vc, gc, bc = q[:, c0:c1], k[:, c0:c1], v[:, c0:c1], g[:, c0:c1], beta[:, c0:c1]

        # Step 2: chunk-local cumulative log-decay Gamma_t = sum_{j<=t} g_j  (<= 0, non-increasing).
        # Gates are floored at GATE_FLOOR (exp of it is exactly 0 in fp32 and fp64, so no result
        # changes) and summed in fp64: a huge gate must not absorb the small ones after it, whose
        # differences Gamma_t - Gamma_i carry the decays between later tokens (docs/kda.md, step 2).
        G64 = gc.to(torch.float64).clamp(min=GATE_FLOOR).cumsum(dim=1)  # [HV, n, K]
        G = G64.to(q.dtype)

        # Step 3: pairwise decay D[t, i] = exp(Gamma_t - Gamma_i) for i <= t, 0 above the diagonal.
        # Masking happens *before* exp, so no exponent above 0 is ever formed.
        causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        diff = G64.unsqueeze(2) - G64.unsqueeze(1)  # [HV, t, i, K]
        D = torch.exp(torch.where(causal[None, :, :, None], diff, torch.full_like(diff, float("-inf")))).to(q.dtype)

        # Step 5 (intra-chunk attention): Aqk[t, i] = sum_c q_t[c] k_i[c] D[t, i, c], i <= t.
        Aqk = torch.einsum("htc,hic,htic->hti", qc, kc, D)
        G_last = G[:, -1]  # [HV, K]
        k_to_end = kc * torch.exp(G64[:, -1:] - G64).to(q.dtype)  # k_i decayed to the chunk's end (exp <= 1)

        if delta_rule:
            # Step 4 (UT transform): A[t, i] = beta_t sum_c k_t[c] k_i[c] D[t, i, c] for i < t.
            # The writes w satisfy (I + A) w = beta * (v - (exp(Gamma) k) S), so
            # W = U - Wk S with U = (I+A)^-1 diag(beta) V and Wk = (I+A)^-1 diag(beta) exp(Gamma) k.
            strict = torch.ones(n, n, dtype=torch.bool, device=q.device).tril(-1)
            A = torch.einsum("htc,hic,htic->hti", kc, kc, D) * strict * bc.unsqueeze(-1)
            eye = torch.eye(n, dtype=q.dtype, device=q.device)
            rhs = torch.cat([bc.unsqueeze(-1) * vc, bc.unsqueeze(-1) * (kc * torch.exp(G))], dim=-1)
            UW = torch.linalg.solve_triangular(eye + A, rhs, upper=False, unitriangular=True)
            U, Wk = UW[..., : vc.shape[-1]], UW[..., vc.shape[-1] :]
            W = U - Wk @ S  # step 6: the chunk's writes given the incoming state
        else:
            W = bc.unsqueeze(-1) * vc

        # Step 5 (output): o_t = scale * ((exp(Gamma_t) q_t)^T S + sum_{i<=t} Aqk[t, i] w_i).
        outs.append(scale * ((qc * torch.exp(G)) @ S + Aqk @ W))
        # Step 7 (state to the next chunk): S <- Diag(exp(Gamma_last)) S + sum_i (exp(Gamma_last - Gamma_i) k_i) w_i^T.
        S = torch.exp(G_last).unsqueeze(-1) * S + k_to_end.transpose(1, 2) @ W
    o = torch.cat(outs, dim=1) if outs else v.new_zeros(v.shape)
    return o, S


# ----------------------------------------------------------------------------------------------
# Batch / varlen driver shared by every public reference
# ----------------------------------------------------------------------------------------------


def _run(
    algorithm: str,
    q,
    k,
    v,
    g,
    beta,
    *,
    scale,
    initial_state,
    output_final_state,
    cu_seqlens,
    chunk_size: int = 64,
    delta_rule: bool = True,
    gate_per_head: bool = False,
    fusion: KDAFusion | None = None,
):
    gate_raw = fusion is not None and fusion.gate_from_raw
    shape = check_kda_inputs(
        q, k, v, g, beta,
        initial_state=initial_state, cu_seqlens=cu_seqlens,
        gate_per_head=gate_per_head, gate_is_log_decay=not gate_raw,
    )
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if beta is None:
        beta = torch.ones(q.shape[:2] + (shape.HV,), dtype=v.dtype, device=v.device)
    q, k, g, beta = apply_fusion_ref(q, k, g, beta, fusion)
    scale = resolve_scale(scale, shape.K)
    compute = torch.float64 if v.dtype == torch.float64 else torch.float32
    group = shape.HV // shape.H

    if gate_per_head:
        g = g.unsqueeze(-1).expand(*g.shape, shape.K)  # GDN: one decay per head, same for every channel
    sequence = _recurrent_sequence if algorithm == "recurrent" else _chunk_sequence
    extra = {} if algorithm == "recurrent" else {"chunk_size": chunk_size}

    def heads_first(x: torch.Tensor, qk: bool) -> torch.Tensor:
        """[R, L, heads, ...] -> [R * HV, L, ...] in the compute dtype (q/k repeated to HV heads)."""
        x = x.to(compute)
        if qk and group > 1:
            x = x.repeat_interleave(group, dim=2)
        return x.movedim(1, 2).flatten(0, 1)

    def run_rows(span: slice, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the time span ``span`` of every batch row (independent equal-length sequences, folded
        into the head axis) from ``state [rows, HV, K, V]``. Returns ``o [rows, L, HV, V]``, state."""
        args = [heads_first(x[:, span], qk) for x, qk in ((q, True), (k, True), (v, False), (g, False), (beta, False))]
        o_f, S = sequence(*args, state.flatten(0, 1), scale, delta_rule, **extra)
        R = state.shape[0]
        return o_f.unflatten(0, (R, shape.HV)).movedim(1, 2), S.unflatten(0, (R, shape.HV))

    def start_state(n0: int, n1: int) -> torch.Tensor:
        if initial_state is not None:
            return initial_state[n0:n1].to(compute)
        return torch.zeros(n1 - n0, shape.HV, shape.K, shape.V, dtype=compute, device=v.device)

    if cu_seqlens is None:
        # Batch rows are independent sequences of equal length: fold B into the head axis.
        S = start_state(0, shape.B)
        if shape.T > 0:
            o, S = run_rows(slice(0, shape.T), S)
        else:
            o, S = torch.zeros(v.shape, dtype=compute, device=v.device), S.clone()
        final_state = S if output_final_state else None
    else:
        pieces, finals = [], []
        for n, (_, s, e) in enumerate(sequence_spans(shape, cu_seqlens)):
            S = start_state(n, n + 1)
            if e > s:
                o_seq, S = run_rows(slice(s, e), S)
                pieces.append(o_seq)
            finals.append(S[0])
        o = torch.cat(pieces, dim=1) if pieces else torch.zeros(v.shape, dtype=compute, device=v.device)
        final_state = torch.stack(finals) if output_final_state else None
    return o.to(v.dtype), final_state


def recurrent_kda_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    fusion: KDAFusion | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """KDA by its recurrence, one token at a time (shapes in the module docstring).

    Returns ``(o, final_state)``; ``final_state`` is None unless ``output_final_state``.
    """
    return _run("recurrent", q, k, v, g, beta, scale=scale, initial_state=initial_state,
                output_final_state=output_final_state, cu_seqlens=cu_seqlens, fusion=fusion)


def chunk_kda_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
    fusion: KDAFusion | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """KDA by the chunkwise (WY / UT transform) algorithm; equals :func:`recurrent_kda_ref`.

    ``chunk_size`` tokens per chunk (any T; the last chunk of a sequence may be shorter).
    """
    return _run("chunk", q, k, v, g, beta, scale=scale, initial_state=initial_state,
                output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                chunk_size=chunk_size, fusion=fusion)


def recurrent_gdn_ref(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False,
                      cu_seqlens=None):
    """Gated DeltaNet by its recurrence: as KDA with one log-decay per head, ``g [B, T, HV]``."""
    return _run("recurrent", q, k, v, g, beta, scale=scale, initial_state=initial_state,
                output_final_state=output_final_state, cu_seqlens=cu_seqlens, gate_per_head=True)


def chunk_gdn_ref(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False,
                  cu_seqlens=None, chunk_size: int = 64):
    """Gated DeltaNet, chunkwise: as KDA with one log-decay per head, ``g [B, T, HV]``."""
    return _run("chunk", q, k, v, g, beta, scale=scale, initial_state=initial_state,
                output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                chunk_size=chunk_size, gate_per_head=True)


def recurrent_decay_ref(q, k, v, g, beta=None, *, scale=None, initial_state=None, output_final_state=False,
                        cu_seqlens=None):
    """Decay-only recurrence (no delta rule): ``S_t = Diag(exp(g_t)) S_{t-1} + beta_t k_t v_t^T``."""
    return _run("recurrent", q, k, v, g, beta, scale=scale, initial_state=initial_state,
                output_final_state=output_final_state, cu_seqlens=cu_seqlens, delta_rule=False)


def chunk_decay_ref(q, k, v, g, beta=None, *, scale=None, initial_state=None, output_final_state=False,
                    cu_seqlens=None, chunk_size: int = 64):
    """Decay-only recurrence, chunkwise (steps 2, 3, 5, 7 without the UT transform)."""
    return _run("chunk", q, k, v, g, beta, scale=scale, initial_state=initial_state,
                output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                chunk_size=chunk_size, delta_rule=False)
