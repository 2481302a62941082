"""Causal softmax attention through PyTorch SDPA (flash / memory-efficient kernels on GPU).

| tensor         | shape               | notes                                             |
|----------------|---------------------|---------------------------------------------------|
| q              | ``[B, Tq, H, Dk]``  | query i sits at absolute position ``S - Tq + i``  |
| k              | ``[B, S, H, Dk]``   | S >= Tq (S > Tq when earlier keys come from a cache) |
| v              | ``[B, S, H, Dv]``   | Dv may differ from Dk (MLA: 192 vs 128)           |
| attention_mask | ``[B, S]`` or None  | bool/int, 1 = real token, 0 = padding             |
| cu_seqlens     | int ``[N+1]`` or None | B == 1, Tq == S: N packed sequences, attention stays inside each |
| return         | ``[B, Tq, H, Dv]``  | dtype of q                                        |
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["causal_attention", "causal_padding_mask"]


def causal_padding_mask(
    attention_mask: torch.Tensor | None, Tq: int, S: int, device: torch.device,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Boolean ``[B or 1, 1, Tq, S]`` mask (True = may attend), or None when plain causal suffices.

    A query may see key j when ``j <= its position`` and key j is a real token. A padded query
    additionally sees itself, so no row is empty (an all-masked softmax row is NaN, and NaN
    gradients would flow back through the pad positions).
    """
    if attention_mask is None and Tq == S and cu_seqlens is None:
        return None
    q_pos = torch.arange(S - Tq, S, device=device)[:, None]
    k_pos = torch.arange(S, device=device)[None, :]
    allowed = (k_pos <= q_pos)[None]  # [1, Tq, S]
    if cu_seqlens is not None:  # block-diagonal: a packed sequence never sees its neighbours
        offsets = cu_seqlens.to(device=device, dtype=torch.long)
        seq = torch.bucketize(torch.arange(S, device=device), offsets[1:], right=True)  # [S]
        allowed = allowed & (seq[S - Tq:, None] == seq[None, :])[None]
    if attention_mask is not None:
        valid = attention_mask.to(device=device, dtype=torch.bool)  # [B, S]
        allowed = (allowed & valid[:, None, :]) | (k_pos == q_pos)[None]
    return allowed[:, None]


def causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    attention_mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of q over k/v (shapes in the module docstring); ``scale`` defaults to ``Dk ** -0.5``."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be 4-D [B, T, H, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, Tq, H, Dk = q.shape
    S = k.shape[1]
    if k.shape != (B, S, H, Dk):
        raise ValueError(f"k must be [B={B}, S, H={H}, Dk={Dk}], got {tuple(k.shape)}")
    if v.shape[:3] != (B, S, H):
        raise ValueError(f"v must be [B={B}, S={S}, H={H}, Dv], got {tuple(v.shape)}")
    if S < Tq:
        raise ValueError(f"need at least as many keys as queries, got S={S} < Tq={Tq}")
    if attention_mask is not None and tuple(attention_mask.shape) != (B, S):
        raise ValueError(f"attention_mask must be [B, S] = {(B, S)}, got {tuple(attention_mask.shape)}")
    if cu_seqlens is not None:
        if B != 1 or Tq != S:
            raise ValueError(f"with cu_seqlens the batch must be 1 and Tq == S, got B={B}, Tq={Tq}, S={S}")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != S:
            raise ValueError(f"cu_seqlens must be [N+1] offsets from 0 to T={S}, got {cu_seqlens.tolist()}")
    mask = causal_padding_mask(attention_mask, Tq, S, q.device, cu_seqlens)
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if mask is None:
        o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale)
    else:
        o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale)
    return o.transpose(1, 2)
