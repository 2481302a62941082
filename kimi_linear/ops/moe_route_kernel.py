"""Triton inference kernel for :func:`kimi_linear.ops.moe.route` without expert groups (imported lazily).

One launch per MoE layer turns router logits into the chosen experts and their weights: sigmoid,
score-correction bias, top-k (k rounds of argmax with the winner masked out), gather of the
uncorrected scores, renormalisation and scaling. PyTorch needs ~7 launches for the same (sigmoid, add,
topk, gather, sum, divide, multiply), which a batch-1 decode step pays in every MoE layer.

Launch grid: ``(N,)``, one program per token.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _route_kernel(logits, bias, weights, indices, E, scaling,
                  EP: tl.constexpr, TOPK: tl.constexpr, KP: tl.constexpr, HAS_BIAS: tl.constexpr,
                  RENORM: tl.constexpr):
    i_n = tl.program_id(0).to(tl.int64)
    o_e = tl.arange(0, EP)
    o_k = tl.arange(0, KP)
    m_e = o_e < E
    b_s = tl.sigmoid(tl.load(logits + i_n * E + o_e, mask=m_e, other=0).to(tl.float32))
    b_c = b_s
    if HAS_BIAS:
        b_c = b_s + tl.load(bias + o_e, mask=m_e, other=0).to(tl.float32)
    b_c = tl.where(m_e, b_c, float("-inf"))
    b_w = tl.zeros([KP], dtype=tl.float32)
    b_i = tl.zeros([KP], dtype=tl.int64)
    for i in tl.static_range(TOPK):
        j = tl.argmax(b_c, axis=0)
        b_w = tl.where(o_k == i, tl.sum(tl.where(o_e == j, b_s, 0.0), axis=0), b_w)
        b_i = tl.where(o_k == i, j.to(tl.int64), b_i)
        b_c = tl.where(o_e == j, float("-inf"), b_c)
    if RENORM:
        b_w = b_w / (tl.sum(b_w, axis=0) + 1e-20)
    m_k = o_k < TOPK
    tl.store(weights + i_n * TOPK + o_k, b_w * scaling, mask=m_k)
    tl.store(indices + i_n * TOPK + o_k, b_i, mask=m_k)


def route_triton(logits: torch.Tensor, correction_bias: torch.Tensor | None, top_k: int, renormalize: bool,
                 scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``logits [N, E]`` -> ``(weights [N, k] fp32, indices [N, k] int64)``, unsorted slots."""
    N, E = logits.shape
    logits = logits.contiguous()
    weights = torch.empty(N, top_k, dtype=torch.float32, device=logits.device)
    indices = torch.empty(N, top_k, dtype=torch.int64, device=logits.device)
    if N > 0:
        bias = correction_bias.contiguous() if correction_bias is not None else logits
        _route_kernel[(N,)](logits, bias, weights, indices, E, float(scaling), EP=triton.next_power_of_2(E),
                            TOPK=top_k, KP=triton.next_power_of_2(top_k), HAS_BIAS=correction_bias is not None,
                            RENORM=renormalize, num_warps=1 if E <= 256 else 4)
    return weights, indices
