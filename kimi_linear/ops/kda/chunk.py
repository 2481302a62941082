"""``chunk_kda``: the public chunked KDA entry (training and prefill).

Dispatches to the Triton kernels on CUDA (``backend="auto"``) and to :func:`chunk_kda_ref`
elsewhere; ``backend`` forces a choice. Same contract as :func:`chunk_kda_ref` (docs/kda.md).
The Triton path is a ``torch.autograd.Function`` (forward: :mod:`.chunk_fwd`, backward:
:mod:`.chunk_bwd`; design and costs in docs/kernels.md), imported only when it is used.
"""

from __future__ import annotations

import torch

from kimi_linear.backends import resolve_backend
from kimi_linear.ops.kda.contract import check_kda_inputs, resolve_scale
from kimi_linear.ops.kda.fusion import KDAFusion
from kimi_linear.ops.kda.reference import chunk_kda_ref

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# The reference forms an [n, n, K] pairwise-decay tensor per chunk of n tokens, so its cost per token
# grows with n; any chunk size gives the same result (tests/ops/test_kda_reference.py). 16-token
# chunks made a KDA layer's CPU forward+backward ~7x faster than 64 at the quickstart's shapes.
REFERENCE_CHUNK_SIZE = 16
_MAX_K = 128  # the backward keeps three [64, K] fp32 tiles per program


class _ChunkKDAFunction(torch.autograd.Function):
    """Triton chunked KDA with hand-written backward. Tensors arrive ``[B, T, ...]``; kernels see the
    packed stream ``[B*T, ...]`` and ``offsets`` (the sequence boundaries in it)."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, A_log, dt_bias, initial_state, scale, offsets, output_final_state,
                qk_l2norm, beta_sigmoid, for_backward):
        from kimi_linear.ops.kda.chunk_common import build_chunk_table
        from kimi_linear.ops.kda.chunk_fwd import chunk_kda_fwd

        B, T, H, K = q.shape
        HV, V = v.shape[2], v.shape[3]
        table = build_chunk_table(offsets, q.device)
        q2 = q.reshape(B * T, H, K).contiguous()
        k2 = k.reshape(B * T, H, K).contiguous()
        v2 = v.reshape(B * T, HV, V).contiguous()
        g2 = g.reshape(B * T, HV, K).contiguous()
        b2 = beta.reshape(B * T, HV).contiguous()
        h0 = initial_state.contiguous() if initial_state is not None else None
        # for_backward False (grad mode off, or no input needs a gradient: inference, prefill): nothing is
        # kept for a backward
        o, ht, saved = chunk_kda_fwd(q2, k2, v2, g2, b2, scale=scale, initial_state=h0,
                                     output_final_state=output_final_state, table=table, A_log=A_log,
                                     dt_bias=dt_bias, beta_sigmoid=beta_sigmoid, qk_l2norm=qk_l2norm,
                                     for_backward=for_backward)
        if not for_backward:
            return o.view(B, T, HV, V), ht
        # with the fused norm, the backward keeps the normalised q / k (and their rstd), not the raw ones
        q2, k2 = saved.pop("q", q2), saved.pop("k", k2)
        rq, rk = saved.pop("rq", None), saved.pop("rk", None)
        ctx.saved_keys = list(saved.keys())
        ctx.save_for_backward(q2, k2, v2, g2, b2, A_log, dt_bias, rq, rk, *saved.values())
        ctx.table, ctx.scale, ctx.shape = table, scale, (B, T, H, HV, K, V)
        ctx.flags = (initial_state is not None, qk_l2norm, beta_sigmoid, q.dtype, k.dtype)
        return o.view(B, T, HV, V), ht

    @staticmethod
    def backward(ctx, do, dht):
        from kimi_linear.ops.kda.chunk_bwd import chunk_kda_bwd, l2norm_bwd

        q2, k2, v2, g2, b2, A_log, dt_bias, rq, rk, *rest = ctx.saved_tensors
        saved = dict(zip(ctx.saved_keys, rest))
        B, T, H, HV, K, V = ctx.shape
        has_h0, qk_l2norm, beta_sigmoid, q_dtype, k_dtype = ctx.flags
        # the kernels write dq / dk in the input dtype when nothing (GVA sum, l2norm backward) follows,
        # or ahead of the l2norm backward with the launch table's l2norm half_dy (see chunk_common.LAUNCH);
        # without GVA the l2norm backward runs inside chunk_kda_bwd (with the gate gradients in one launch
        # when the launch table's gate_grad merge_l2norm is set)
        from kimi_linear.ops.kda.chunk_common import LAUNCH

        half_dy = bool(LAUNCH["l2norm"].get("half_dy"))
        direct = HV == H and (not qk_l2norm or half_dy) and q_dtype == k_dtype
        norm_inside = qk_l2norm and HV == H
        dq, dk, dv, dg, dbeta, dh0, dA_log, ddt_bias = chunk_kda_bwd(
            q2, k2, v2, g2, b2, saved, do.reshape(B * T, HV, V), dht.contiguous() if dht is not None else None,
            scale=ctx.scale, has_initial_state=has_h0, table=ctx.table, A_log=A_log, dt_bias=dt_bias,
            beta_sigmoid=beta_sigmoid, grad_dtype=q_dtype if direct else torch.float32,
            l2norm=(rq, rk, q_dtype, k_dtype) if norm_inside else None)
        # value heads sharing a q/k head (GVA) add their gradients, then the norm's backward
        if HV != H:
            dq = dq.view(B * T, H, HV // H, K).sum(2)
            dk = dk.view(B * T, H, HV // H, K).sum(2)
            if qk_l2norm:
                dq, dk = l2norm_bwd((q2, rq, dq, q_dtype), (k2, rk, dk, k_dtype))
        return (dq.to(q_dtype).view(B, T, H, K), dk.to(k_dtype).view(B, T, H, K), dv.view(B, T, HV, V),
                dg.view(B, T, HV, K), dbeta.view(B, T, HV), dA_log, ddt_bias, dh0,
                None, None, None, None, None, None)


def _chunk_kda_triton(q, k, v, g, beta, *, scale, initial_state, output_final_state, cu_seqlens, fusion):
    gate_raw = fusion is not None and fusion.gate_from_raw
    shape = check_kda_inputs(q, k, v, g, beta, initial_state=initial_state, cu_seqlens=cu_seqlens,
                             gate_is_log_decay=not gate_raw, check_values=False)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dtype not in _KERNEL_DTYPES:
            raise TypeError(f"backend='triton' takes fp16/bf16/fp32 {name}, got {t.dtype} (use backend='reference' for fp64)")
    if shape.K > _MAX_K:
        raise ValueError(f"the Triton chunk_kda supports K <= {_MAX_K}, got K={shape.K}")
    if initial_state is not None and initial_state.dtype != torch.float32:
        raise TypeError(f"initial_state must be float32 for the Triton path, got {initial_state.dtype}")
    scale = resolve_scale(scale, shape.K)
    if cu_seqlens is not None:
        offsets = [int(x) for x in cu_seqlens.tolist()]
    else:
        offsets = [b * shape.T for b in range(shape.B + 1)]
    A_log = dt_bias = None
    if gate_raw:
        from kimi_linear.ops.kda.gate import _gate_params

        a, b = _gate_params(fusion.A_log, fusion.dt_bias, shape.HV, shape.K)
        A_log = a.reshape(-1).float().contiguous()
        dt_bias = b.reshape(-1).float().contiguous()
    qk_l2norm = fusion is not None and fusion.qk_l2norm
    beta_sigmoid = fusion is not None and fusion.beta_sigmoid
    # (decided here: inside an autograd.Function's forward grad mode is always off, and its
    # needs_input_grad reports requires_grad even under torch.no_grad)
    for_backward = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, g, beta, A_log, dt_bias, initial_state))
    o, ht = _ChunkKDAFunction.apply(q, k, v, g, beta, A_log, dt_bias, initial_state, scale, offsets,
                                    output_final_state, qk_l2norm, beta_sigmoid, for_backward)
    return o, ht


def chunk_kda(
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
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked KDA (docs/kda.md steps 2-7), differentiable in every tensor input.

    | arg            | shape             | notes                                              |
    |----------------|-------------------|----------------------------------------------------|
    | q, k           | ``[B, T, H, K]``  | raw when ``fusion.qk_l2norm`` (normalised inside)  |
    | v              | ``[B, T, HV, V]`` | HV % H == 0                                        |
    | g              | ``[B, T, HV, K]`` | log-decay <= 0, or the raw gate with fused A_log/dt_bias |
    | beta           | ``[B, T, HV]``    | logits when ``fusion.beta_sigmoid``                |
    | initial_state  | ``[N, HV, K, V]`` | float32                                            |
    | cu_seqlens     | ``[N+1]`` int     | B == 1; sequences packed along T                   |
    | return o       | ``[B, T, HV, V]`` | dtype of v                                         |
    | return final   | ``[N, HV, K, V]`` | float32, or None unless ``output_final_state``     |

    The Triton path (K <= 128; fp16/bf16/fp32) does not read the gate values to check ``g <= 0``
    (that would cost a device sync); the reference does.
    """
    chosen = resolve_backend(backend, q.device)
    if chosen == "reference":
        return chunk_kda_ref(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                             output_final_state=output_final_state, cu_seqlens=cu_seqlens, fusion=fusion,
                             chunk_size=REFERENCE_CHUNK_SIZE)
    return _chunk_kda_triton(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                             output_final_state=output_final_state, cu_seqlens=cu_seqlens, fusion=fusion)
