"""Triton split-KV (flash-decoding) kernel for absorbed MLA attention over the latent cache.

Semantics and shapes: :mod:`kimi_linear.ops.latent_attention`. The query side is absorbed in PyTorch
(``q_lat = W_uk^T q_nope``, a tiny matmul); the kernel then runs multi-query attention in which all
``M = T * H`` query rows of a sequence share one key/value stream, so each latent tile is read from
memory once and used twice (scores against ``[c, k_r]``, then the value sum over ``c``). The key axis
is split across programs so that a single long sequence still fills the GPU; each program leaves a
partial context and its log-sum-exp, and a small PyTorch combine merges them. The output projection
``W_uv`` is applied afterwards (one matmul).

Program grid: ``(B, S)``, ``S`` splits of the key axis. Inside: ``BLOCK_M >= M`` query rows,
``BLOCK_N`` keys per iteration, latent width ``R`` and key part ``DR`` (powers of two).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kimi_linear.ops.latent_attention import _check, split_kv_b


@triton.jit
def _latent_attn_split_kernel(
    q_lat_ptr, q_rope_ptr, c_ptr, kr_ptr, len_ptr, o_ptr, lse_ptr,
    L, M, T, H, keys_per_split, sm_scale,
    stride_qb, stride_qm, stride_qrb, stride_qrm,
    stride_cb, stride_cl, stride_krb, stride_krl,
    stride_ob, stride_os, stride_om, stride_lb, stride_ls,
    R: tl.constexpr, DR: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    i_b = tl.program_id(0).to(tl.int64)
    i_s = tl.program_id(1).to(tl.int64)
    o_m = tl.arange(0, BLOCK_M)
    o_r = tl.arange(0, R)
    o_d = tl.arange(0, DR)
    m_m = o_m < M
    length = tl.load(len_ptr + i_b).to(tl.int64)
    # query row m is token t = m // H of the T new tokens; it sees keys j < length - (T - 1 - t)
    limit = length - (T - 1) + (o_m // H)

    p_q = q_lat_ptr + i_b * stride_qb + o_m[:, None] * stride_qm + o_r[None, :]
    b_q = tl.load(p_q, mask=m_m[:, None], other=0.0)
    p_qr = q_rope_ptr + i_b * stride_qrb + o_m[:, None] * stride_qrm + o_d[None, :]
    b_qr = tl.load(p_qr, mask=m_m[:, None], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, R], dtype=tl.float32)

    start = i_s * keys_per_split
    end = tl.minimum(start + keys_per_split, length)
    for j0 in range(start, end, BLOCK_N):
        o_n = j0 + tl.arange(0, BLOCK_N)
        m_n = o_n < end
        b_c = tl.load(c_ptr + i_b * stride_cb + o_n[:, None] * stride_cl + o_r[None, :], mask=m_n[:, None], other=0.0)
        b_kr = tl.load(kr_ptr + i_b * stride_krb + o_n[:, None] * stride_krl + o_d[None, :], mask=m_n[:, None], other=0.0)
        b_s = tl.dot(b_q, tl.trans(b_c)) + tl.dot(b_qr, tl.trans(b_kr))
        b_s = b_s * sm_scale
        valid = (o_n[None, :] < limit[:, None]) & m_n[None, :]
        b_s = tl.where(valid, b_s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(b_s, 1))
        # rows that have seen no valid key yet keep m = -inf; shift by 0 there so no (-inf) - (-inf) forms
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        b_p = tl.exp(b_s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(b_p, 1)
        acc = acc * alpha[:, None] + tl.dot(b_p.to(b_c.dtype), b_c)
        m_i = m_new

    lse = tl.where(l_i > 0, m_i + tl.log(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    p_o = o_ptr + i_b * stride_ob + i_s * stride_os + o_m[:, None] * stride_om + o_r[None, :]
    tl.store(p_o, out, mask=m_m[:, None])
    tl.store(lse_ptr + i_b * stride_lb + i_s * stride_ls + o_m, lse, mask=m_m)


def _num_splits(B: int, L: int, block_n: int, device: torch.device) -> int:
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    else:
        sms = 4
    want = max(1, (2 * sms) // max(B, 1))
    return max(1, min(want, triton.cdiv(L, block_n)))


def latent_attention_triton(
    q_nope: torch.Tensor,
    q_rope: torch.Tensor,
    latent: torch.Tensor,
    k_rope: torch.Tensor,
    w_kv_b: torch.Tensor,
    *,
    lengths: torch.Tensor,
    scale: float | None = None,
    block_n: int | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Absorbed MLA attention with the split-KV Triton kernel. Same contract as ``latent_attention_ref``
    (``lengths`` form only). No host sync: shapes alone fix the launch, so it can be graph-captured."""
    B, T, H, Dn, Dr, L, R, Dv = _check(q_nope, q_rope, latent, k_rope, w_kv_b, lengths, None)
    if R & (R - 1) or Dr & (Dr - 1) or R < 16 or Dr < 16:
        raise ValueError(f"the Triton latent kernel needs power-of-two R, Dr >= 16, got R={R}, Dr={Dr}")
    scale = (Dn + Dr) ** -0.5 if scale is None else float(scale)
    M = T * H
    block_m = max(16, triton.next_power_of_2(M))
    if block_n is None:
        block_n = 32 if R >= 256 else 16
    S = num_splits or _num_splits(B, L, block_n, latent.device)
    keys_per_split = triton.cdiv(triton.cdiv(L, S), block_n) * block_n
    S = triton.cdiv(L, keys_per_split)

    w_uk, w_uv = split_kv_b(w_kv_b, H, Dn, Dv)
    kdt = latent.dtype
    q_lat = torch.einsum("bthd,hdr->bthr", q_nope.to(w_uk.dtype), w_uk).reshape(B, M, R).to(kdt).contiguous()
    q_r = q_rope.reshape(B, M, Dr).to(kdt).contiguous()
    if latent.stride(-1) != 1 or k_rope.stride(-1) != 1:
        raise ValueError("latent and k_rope need a contiguous last dim")
    o_part = torch.empty(B, S, M, R, device=latent.device, dtype=torch.float32)
    lse = torch.empty(B, S, M, device=latent.device, dtype=torch.float32)
    lengths = lengths.to(device=latent.device)
    _latent_attn_split_kernel[(B, S)](
        q_lat, q_r, latent, k_rope, lengths, o_part, lse,
        L, M, T, H, keys_per_split, scale,
        q_lat.stride(0), q_lat.stride(1), q_r.stride(0), q_r.stride(1),
        latent.stride(0), latent.stride(1), k_rope.stride(0), k_rope.stride(1),
        o_part.stride(0), o_part.stride(1), o_part.stride(2), lse.stride(0), lse.stride(1),
        R=R, DR=Dr, BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=8 if R >= 256 else 4, num_stages=2,
    )
    # Merge the splits: weights exp(lse_s - max_s lse); a row with no key anywhere gets zero output.
    lse_max = lse.max(dim=1, keepdim=True).values
    lse_max = torch.where(torch.isfinite(lse_max), lse_max, torch.zeros_like(lse_max))
    w = torch.exp(lse - lse_max)                                   # [B, S, M], 0 for empty splits
    ctx = (o_part * w.unsqueeze(-1)).sum(dim=1) / w.sum(dim=1).clamp_min(math.ldexp(1.0, -126)).unsqueeze(-1)
    ctx = ctx.view(B, T, H, R)
    out = torch.einsum("bthr,hvr->bthv", ctx.to(w_uv.dtype), w_uv)
    return out.to(q_nope.dtype)
