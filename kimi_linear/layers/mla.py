"""``MultiHeadLatentAttention``: MLA without position encoding (the full-attention layer of Kimi Linear).

    q            = q_proj(x)                                   [B, T, H, nope + rope]
    latent, k_r  = split(kv_a_proj_with_mqa(x))                [B, T, R], [B, T, rope]   (R = kv_lora_rank)
    latent       = kv_a_layernorm(latent)
    k_nope, v    = split(kv_b_proj(latent))                    [B, T, H, nope], [B, T, H, v]
    k            = cat(k_nope, k_r broadcast over heads)       (k_r is shared and never rotated: NoPE)
    o            = softmax(q k^T * (nope + rope)^-0.5, causal) v
    y            = o_proj(o)                                   [B, T, D]

A decoder caches only ``(latent, k_r)`` per token (R + rope values); the cached path (issue 5) plugs
in between :meth:`compress_kv` and :meth:`expand_kv`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kimi_linear.layers.common import RMSNorm, add_residual, apply_input_norm, bool_mask
from kimi_linear.ops.attention import causal_attention
from kimi_linear.ops.gemv import few_rows_linear, fused_linear
from kimi_linear.ops.latent_attention import latent_attention, masked_attention

__all__ = ["MultiHeadLatentAttention"]

# Prefetch the layer's output projection into L2 on a side stream, forked after the latent split kernel so
# that it streams beside the merge and the output absorption only (a hint; an A/B switch for
# benchmarks/decode_profile.py --ab kimi_linear.layers.mla:PREFETCH_OUTPUT_PROJECTION). On: 2.819 -> 2.811 ms
# per step at 4K, 3.011 -> 3.009 at 64K, 3.194 -> 3.191 at 128K (results/decode/session27/
# ab_prefetch_after_split_h100.txt). Forked before the attention instead (session 25) it lost at 64K,
# 3.047 -> 3.068, where the split kernel streams the cache and the prefetch took bandwidth from it
PREFETCH_OUTPUT_PROJECTION = True

class MultiHeadLatentAttention(nn.Module):
    """Multi-head latent attention, NoPE.

    Args:
        config: uses ``hidden_size``, ``num_attention_heads``, ``qk_nope_head_dim``, ``qk_rope_head_dim``,
            ``v_head_dim``, ``kv_lora_rank``.
        layer_idx: 0-based index in the stack.

    | forward arg     | shape                 |
    |-----------------|-----------------------|
    | hidden_states   | ``[B, T, D]``         |
    | attention_mask  | ``[B, T]`` 1 = real   |
    | return          | ``[B, T, D]``         |
    """

    def __init__(self, config: Any, layer_idx: int = 0, backend: str = "auto") -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.backend = backend  # the latent decode kernel and the latent norm's inference kernel
        D = config.hidden_size
        self.num_heads = H = config.num_attention_heads
        self.nope_dim = config.qk_nope_head_dim
        self.rope_dim = config.qk_rope_head_dim
        self.v_dim = config.v_head_dim
        self.kv_lora_rank = config.kv_lora_rank
        self.qk_dim = self.nope_dim + self.rope_dim
        self.scale = self.qk_dim ** -0.5
        self.q_proj = nn.Linear(D, H * self.qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, self.kv_lora_rank + self.rope_dim, bias=False)
        # The released model builds this norm with the default eps (1e-6), not config.rms_norm_eps.
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, eps=1e-6, backend=backend)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, H * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(H * self.v_dim, D, bias=False)

    # ------------------------------------------------------------------ steps
    def project_q(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, T, D]`` -> ``q [B, T, H, nope + rope]``."""
        return self.q_proj(x).unflatten(-1, (self.num_heads, self.qk_dim))

    def compress_kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, T, D]`` -> ``(latent [B, T, R] normalised, k_rope [B, T, rope])``: what a cache stores."""
        kv = self.kv_a_proj_with_mqa(x)
        latent, k_rope = kv.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        return self.kv_a_layernorm(latent), k_rope

    def expand_kv(self, latent: torch.Tensor, k_rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents ``[B, S, R]``, ``[B, S, rope]`` -> ``k [B, S, H, nope + rope]``, ``v [B, S, H, v]``."""
        kv = self.kv_b_proj(latent).unflatten(-1, (self.num_heads, self.nope_dim + self.v_dim))
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k_shared = k_rope.unsqueeze(2).expand(*k_rope.shape[:2], self.num_heads, self.rope_dim)
        return torch.cat([k_nope, k_shared], dim=-1), v

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                key_mask: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """Causal attention (queries aligned to the last keys) -> ``[B, Tq, H * v]``."""
        o = causal_attention(q, k, v, scale=self.scale, attention_mask=key_mask, cu_seqlens=cu_seqlens)
        return o.flatten(-2)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: Any = None,
        *,
        input_norm: tuple[torch.Tensor, float] | None = None,
        residual: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """``hidden_states [B, T, D]`` -> ``[B, T, D]``.

        ``input_norm = (weight [D], eps)``: ``hidden_states`` is not yet normalised (the block's input
        norm); ``residual [B, T, D]``: returns ``residual + output``. The decode step folds both into
        its projections (docs/decode.md); every other path applies them apart."""
        if cache is not None:
            return self._forward_cached(hidden_states, cache, input_norm, residual)
        if hidden_states.dim() != 3:
            raise ValueError(f"hidden_states must be [B, T, D], got shape {tuple(hidden_states.shape)}")
        B, T, _ = hidden_states.shape
        hidden_states = apply_input_norm(hidden_states, input_norm, self.backend)
        mask = bool_mask(attention_mask, B, T)
        q = self.project_q(hidden_states)
        k, v = self.expand_kv(*self.compress_kv(hidden_states))
        return add_residual(self.o_proj(self._attend(q, k, v, mask, kwargs.get("cu_seqlens"))), residual)

    def _forward_cached(self, hidden_states: torch.Tensor, cache: Any,
                        input_norm: tuple[torch.Tensor, float] | None = None,
                        residual: torch.Tensor | None = None) -> torch.Tensor:
        """Prefill / decode against a :class:`kimi_linear.generation.cache.HybridCache` (its open step).

        Every step writes only ``(latent, k_rope)`` into the cache. Decode reads the latent cache
        through the absorbed projections (:func:`kimi_linear.ops.latent_attention.latent_attention`,
        never decompressing it); a first prefill attends within the prompt exactly as the uncached
        forward; a later piece of a prompt expands the cached latents and attends with a per-row mask.
        ``input_norm`` and ``residual`` as in :meth:`forward`: the decode step's input launch applies
        the norm and its output projection adds the residual.
        """
        step = cache.step
        if step is None:
            raise RuntimeError("a cached forward needs an open cache step (HybridCache.begin_step)")
        B, T, _ = hidden_states.shape
        cache.check_batch(B, "hidden_states")
        lc = cache.layers[self.layer_idx]
        if step.decode:  # both projections of the token in one launch (the block's input norm folded in)
            nw, eps = input_norm if input_norm is not None else (None, 0.0)
            q, kv = fused_linear(hidden_states.reshape(B, -1), [self.q_proj.weight, self.kv_a_proj_with_mqa.weight],
                                 norm_weight=nw, eps=eps, backend=self.backend)
            q = q.view(B, T, self.num_heads, self.qk_dim)
            latent, k_rope = kv.view(B, T, -1).split([self.kv_lora_rank, self.rope_dim], -1)
            # the latent norm writes into the cache, the shared key part copied in the same launch
            lc.write_decode_normed(latent, k_rope, self.kv_a_layernorm, step)
        else:
            hidden_states = apply_input_norm(hidden_states, input_norm, self.backend)
            q = self.project_q(hidden_states)
            latent, k_rope = self.compress_kv(hidden_states)
            lc.write(latent, k_rope, step)
        if step.decode:
            q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)
            c, kr = lc.view(step)
            o = latent_attention(q_nope, q_rope, c, kr, self.kv_b_proj.weight, lengths=step.decode_rows_lengths[1],
                                 scale=self.scale, backend=self.backend,
                                 prefetch_after_split=self.o_proj.weight if PREFETCH_OUTPUT_PROJECTION else None)
            return few_rows_linear(o.flatten(-2), self.o_proj.weight, residual=residual, backend=self.backend)
        if step.fresh:
            k, v = self.expand_kv(latent, k_rope)
            return add_residual(self.o_proj(self._attend(q, k, v, step.token_mask)), residual)
        c, kr = lc.view(step)
        k, v = self.expand_kv(c.to(q.dtype), kr.to(q.dtype))
        o = masked_attention(q, k, v, step.key_mask, scale=self.scale)
        return add_residual(self.o_proj(o.flatten(-2)), residual)
