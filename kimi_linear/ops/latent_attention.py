"""MLA attention read straight from the compressed latent cache (absorbed projections, NoPE).

Multi-head latent attention stores per token a normalised latent ``c`` (``R = kv_lora_rank`` wide)
and a key part ``k_r`` shared by all heads (``Dr = qk_rope_head_dim`` wide). ``kv_b_proj`` expands the
latent into per-head keys and values: ``k_h = [W_uk_h c, k_r]``, ``v_h = W_uv_h c``. Kimi Linear uses no
rotary embedding (NoPE), so nothing position-dependent sits between ``W_uk_h`` and the dot product
and the projections can be moved onto the query and output sides exactly:

    q_h . k_h = (W_uk_h^T q_nope_h) . c + q_rope_h . k_r          (a 576-wide key for R=512, Dr=64)
    o_h       = W_uv_h (sum_j p_hj c_j)                            (a 512-wide value)

so decoding is multi-query attention over the latent cache, never decompressing it. The softmax scale
stays ``(Dn + Dr) ** -0.5``, the scale of the expanded form.

| tensor   | shape                 | notes                                                   |
|----------|-----------------------|---------------------------------------------------------|
| q_nope   | ``[B, T, H, Dn]``     | query part that meets the latent keys                    |
| q_rope   | ``[B, T, H, Dr]``     | query part that meets the shared key part                |
| latent   | ``[B, L, R]``         | cache (model dtype); positions ``>= lengths[b]`` ignored |
| k_rope   | ``[B, L, Dr]``        | cache                                                    |
| w_kv_b   | ``[H*(Dn+Dv), R]``    | ``kv_b_proj.weight`` (per head: Dn key rows, then Dv value rows) |
| lengths  | ``[B]`` int           | valid cache positions per row, the ``T`` queries' own tokens last |
| key_mask | ``[B, T, L]`` bool    | optional explicit mask instead of ``lengths``            |
| o        | ``[B, T, H, Dv]``     | dtype of ``q_nope``                                      |

With ``lengths``, query ``t`` of row ``b`` sees cache positions ``j < lengths[b] - (T - 1 - t)``
(the queries are the last ``T`` tokens of the row: causal decoding of one or several tokens).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kimi_linear.backends import resolve_backend


def split_kv_b(w_kv_b: torch.Tensor, num_heads: int, qk_nope_head_dim: int, v_head_dim: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of ``kv_b_proj.weight`` as ``W_uk [H, Dn, R]`` and ``W_uv [H, Dv, R]`` (no copy)."""
    if w_kv_b.dim() != 2 or w_kv_b.shape[0] != num_heads * (qk_nope_head_dim + v_head_dim):
        raise ValueError(
            f"w_kv_b must be [H*(Dn+Dv), R] = [{num_heads}*({qk_nope_head_dim}+{v_head_dim}), R], "
            f"got shape {tuple(w_kv_b.shape)}"
        )
    w = w_kv_b.view(num_heads, qk_nope_head_dim + v_head_dim, w_kv_b.shape[1])
    return w[:, :qk_nope_head_dim], w[:, qk_nope_head_dim:]


def _check(q_nope, q_rope, latent, k_rope, w_kv_b, lengths, key_mask):
    for name, t in (("q_nope", q_nope), ("q_rope", q_rope), ("latent", latent), ("k_rope", k_rope), ("w_kv_b", w_kv_b)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating torch.Tensor, got {type(t).__name__}")
    if q_nope.dim() != 4:
        raise ValueError(f"q_nope must be [B, T, H, Dn], got shape {tuple(q_nope.shape)}")
    B, T, H, Dn = q_nope.shape
    if q_rope.dim() != 4 or q_rope.shape[:3] != (B, T, H):
        raise ValueError(f"q_rope must be [B={B}, T={T}, H={H}, Dr], got shape {tuple(q_rope.shape)}")
    Dr = q_rope.shape[3]
    if latent.dim() != 3 or latent.shape[0] != B:
        raise ValueError(f"latent must be [B={B}, L, R], got shape {tuple(latent.shape)}")
    L, R = latent.shape[1], latent.shape[2]
    if tuple(k_rope.shape) != (B, L, Dr):
        raise ValueError(f"k_rope must be [B, L, Dr] = {(B, L, Dr)}, got shape {tuple(k_rope.shape)}")
    if w_kv_b.dim() != 2 or w_kv_b.shape[1] != R or w_kv_b.shape[0] % H or w_kv_b.shape[0] // H <= Dn:
        raise ValueError(f"w_kv_b must be [H*(Dn+Dv), R] with H={H}, Dn={Dn}, R={R}, got shape {tuple(w_kv_b.shape)}")
    if (lengths is None) == (key_mask is None):
        raise ValueError("pass exactly one of lengths [B] and key_mask [B, T, L]")
    if lengths is not None and (lengths.dim() != 1 or lengths.shape[0] != B or lengths.is_floating_point()):
        raise ValueError(f"lengths must be an integer tensor [B={B}], got shape {tuple(lengths.shape)}, {lengths.dtype}")
    if key_mask is not None and (tuple(key_mask.shape) != (B, T, L) or key_mask.dtype != torch.bool):
        raise ValueError(f"key_mask must be bool [B, T, L] = {(B, T, L)}, got shape {tuple(key_mask.shape)}, {key_mask.dtype}")
    Dv = w_kv_b.shape[0] // H - Dn
    return B, T, H, Dn, Dr, L, R, Dv


def mask_from_lengths(lengths: torch.Tensor, T: int, L: int) -> torch.Tensor:
    """``[B, T, L]`` bool: query ``t`` (the ``T`` queries are each row's last tokens) sees ``j < lengths - (T-1-t)``."""
    j = torch.arange(L, device=lengths.device).view(1, 1, L)
    t = torch.arange(T, device=lengths.device).view(1, T, 1)
    return j < (lengths.view(-1, 1, 1) - (T - 1) + t)


def latent_attention_ref(
    q_nope: torch.Tensor,
    q_rope: torch.Tensor,
    latent: torch.Tensor,
    k_rope: torch.Tensor,
    w_kv_b: torch.Tensor,
    *,
    lengths: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Absorbed MLA attention in PyTorch (fp32 arithmetic, fp64 kept). Shapes in the module docstring.

    A query that sees no key (``lengths`` too small) gets a zero output rather than NaN.
    """
    B, T, H, Dn, Dr, L, R, Dv = _check(q_nope, q_rope, latent, k_rope, w_kv_b, lengths, key_mask)
    scale = (Dn + Dr) ** -0.5 if scale is None else float(scale)
    f = torch.float64 if q_nope.dtype == torch.float64 else torch.float32
    w_uk, w_uv = split_kv_b(w_kv_b.to(f), H, Dn, Dv)
    q_lat = torch.einsum("bthd,hdr->bthr", q_nope.to(f), w_uk)            # the 512-wide absorbed query
    c, kr = latent.to(f), k_rope.to(f)
    scores = torch.einsum("bthr,blr->bthl", q_lat, c) + torch.einsum("bthd,bld->bthl", q_rope.to(f), kr)
    mask = key_mask if key_mask is not None else mask_from_lengths(lengths, T, L)
    scores = (scores * scale).masked_fill(~mask.unsqueeze(2), float("-inf"))
    # softmax of an all -inf row is NaN; such a query has no keys, so its output is defined as zero.
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    ctx = torch.einsum("bthl,blr->bthr", probs, c)                          # [B, T, H, R]
    return torch.einsum("bthr,hvr->bthv", ctx, w_uv).to(q_nope.dtype)


def expanded_attention_ref(
    q_nope: torch.Tensor,
    q_rope: torch.Tensor,
    latent: torch.Tensor,
    k_rope: torch.Tensor,
    w_kv_b: torch.Tensor,
    *,
    lengths: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """The same attention in its expanded form (decompress per-head K and V, then softmax attention):
    the definition that :func:`latent_attention_ref` and the kernel are tested against."""
    B, T, H, Dn, Dr, L, R, Dv = _check(q_nope, q_rope, latent, k_rope, w_kv_b, lengths, key_mask)
    scale = (Dn + Dr) ** -0.5 if scale is None else float(scale)
    f = torch.float64 if q_nope.dtype == torch.float64 else torch.float32
    kv = (latent.to(f) @ w_kv_b.to(f).T).view(B, L, H, Dn + Dv)
    k = torch.cat([kv[..., :Dn], k_rope.to(f).unsqueeze(2).expand(B, L, H, Dr)], dim=-1)  # [B, L, H, Dn+Dr]
    v = kv[..., Dn:]
    q = torch.cat([q_nope, q_rope], dim=-1).to(f)
    scores = torch.einsum("bthd,blhd->bthl", q, k) * scale
    mask = key_mask if key_mask is not None else mask_from_lengths(lengths, T, L)
    scores = scores.masked_fill(~mask.unsqueeze(2), float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return torch.einsum("bthl,blhv->bthv", probs, v).to(q_nope.dtype)


def latent_attention(
    q_nope: torch.Tensor,
    q_rope: torch.Tensor,
    latent: torch.Tensor,
    k_rope: torch.Tensor,
    w_kv_b: torch.Tensor,
    *,
    lengths: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str = "auto",
    prefetch_after_split: torch.Tensor | None = None,
) -> torch.Tensor:
    """Absorbed MLA attention over the latent cache; Triton split-KV kernel on CUDA, reference elsewhere.

    The kernel handles the decode case (``lengths`` given); an explicit ``key_mask`` always takes the
    reference path. Shapes in the module docstring. ``prefetch_after_split``: a weight the caller reads
    next (the output projection), asked into L2 on a side stream once the split kernel is queued, so
    that it streams beside the merge and the output absorption (:mod:`kimi_linear.ops.prefetch`; the
    Triton path only, a hint that never changes results).
    """
    chosen = resolve_backend(backend, q_nope.device)
    if chosen == "triton" and key_mask is None:
        from kimi_linear.ops.latent_attention_triton import latent_attention_triton

        return latent_attention_triton(q_nope, q_rope, latent, k_rope, w_kv_b, lengths=lengths, scale=scale,
                                       prefetch_after_split=prefetch_after_split)
    return latent_attention_ref(q_nope, q_rope, latent, k_rope, w_kv_b, lengths=lengths, key_mask=key_mask, scale=scale)


def masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor, *, scale: float | None = None
) -> torch.Tensor:
    """Expanded attention with an explicit per-query key mask (prefill continuing over a cache).

    ``q [B, T, H, Dk]``, ``k [B, L, H, Dk]``, ``v [B, L, H, Dv]``, ``key_mask [B, T, L]`` bool (every
    query must see at least one key) -> ``[B, T, H, Dv]``. PyTorch SDPA (memory-efficient kernel on GPU).
    """
    if key_mask.dim() != 3 or key_mask.shape != (q.shape[0], q.shape[1], k.shape[1]):
        raise ValueError(f"key_mask must be [B, T, L] = {(q.shape[0], q.shape[1], k.shape[1])}, got {tuple(key_mask.shape)}")
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       attn_mask=key_mask.unsqueeze(1), scale=scale)
    return o.transpose(1, 2)
