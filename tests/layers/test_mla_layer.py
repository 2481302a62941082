"""MultiHeadLatentAttention (NoPE) and the SDPA entry: math, padding, query alignment."""

from __future__ import annotations

import pytest
import torch

from kimi_linear.layers.mla import MultiHeadLatentAttention
from kimi_linear.ops.attention import causal_attention
from tests.layers.util import small_config


def make():
    layer = MultiHeadLatentAttention(small_config()).double()
    with torch.no_grad():
        for p in layer.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.4)
    return layer


def by_hand(layer, x):
    B, T, _ = x.shape
    H, dn, dr, dv, R = layer.num_heads, layer.nope_dim, layer.rope_dim, layer.v_dim, layer.kv_lora_rank
    q = layer.q_proj(x).view(B, T, H, dn + dr)
    kv = layer.kv_a_proj_with_mqa(x)
    c = kv[..., :R]
    c = c / torch.sqrt(c.pow(2).mean(-1, keepdim=True) + 1e-6) * layer.kv_a_layernorm.weight
    kvb = layer.kv_b_proj(c).view(B, T, H, dn + dv)
    k = torch.cat([kvb[..., :dn], kv[..., R:].unsqueeze(2).expand(B, T, H, dr)], -1)
    v = kvb[..., dn:]
    s = torch.einsum("bthd,bshd->bhts", q, k) * (dn + dr) ** -0.5
    s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    o = torch.einsum("bhts,bshd->bthd", s.softmax(-1), v)
    return layer.o_proj(o.reshape(B, T, H * dv))


def test_matches_by_hand_and_names():
    layer = make()
    x = torch.randn(2, 13, 32, dtype=torch.float64)
    torch.testing.assert_close(layer(x), by_hand(layer, x), rtol=1e-10, atol=1e-10)
    assert {n: tuple(p.shape) for n, p in layer.named_parameters()} == {
        "q_proj.weight": (24, 32), "kv_a_proj_with_mqa.weight": (20, 32), "kv_a_layernorm.weight": (16,),
        "kv_b_proj.weight": (32, 16), "o_proj.weight": (32, 16)}


def test_padding_left_and_right():
    layer = make()
    a = torch.randn(1, 5, 32, dtype=torch.float64)
    b = torch.randn(1, 8, 32, dtype=torch.float64)
    junk = torch.randn(1, 3, 32, dtype=torch.float64) * 30
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[0, :3] = False
    y = layer(torch.cat([torch.cat([junk, a], 1), b]), attention_mask=mask)
    torch.testing.assert_close(y[0, 3:], layer(a)[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(y[1], layer(b)[0], rtol=1e-10, atol=1e-10)
    assert torch.isfinite(y).all()  # padded queries see themselves, no NaN rows
    y = layer(torch.cat([torch.cat([a, junk], 1), b]), attention_mask=mask.flip(1))
    torch.testing.assert_close(y[0, :5], layer(a)[0], rtol=1e-10, atol=1e-10)


def test_queries_align_to_the_last_keys():
    q = torch.randn(2, 9, 3, 6, dtype=torch.float64)
    k = torch.randn(2, 9, 3, 6, dtype=torch.float64)
    v = torch.randn(2, 9, 3, 4, dtype=torch.float64)
    full = causal_attention(q, k, v)
    tail = causal_attention(q[:, 6:], k, v)
    torch.testing.assert_close(tail, full[:, 6:], rtol=1e-12, atol=1e-12)
    keymask = torch.ones(2, 9, dtype=torch.bool)
    keymask[1, :2] = False
    masked = causal_attention(q[:, 6:], k, v, attention_mask=keymask)
    torch.testing.assert_close(masked[1], causal_attention(q[1:, 6:], k[1:, 2:], v[1:, 2:])[0], rtol=1e-12, atol=1e-12)


def test_bad_input():
    with pytest.raises(ValueError, match="at least as many keys"):
        causal_attention(torch.randn(1, 4, 2, 8), torch.randn(1, 3, 2, 8), torch.randn(1, 3, 2, 8))
    with pytest.raises(ValueError, match="attention_mask must be"):
        causal_attention(torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8),
                         attention_mask=torch.ones(1, 3))


def test_packed_sequences_stay_apart():
    layer = make()
    parts = [torch.randn(1, n, 32, dtype=torch.float64) for n in (4, 1, 9)]
    cu = torch.tensor([0, 4, 5, 14], dtype=torch.int32)
    y = layer(torch.cat(parts, 1), cu_seqlens=cu)
    for i, p in enumerate(parts):
        torch.testing.assert_close(y[:, cu[i]:cu[i + 1]], layer(p), rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="batch must be 1"):
        causal_attention(torch.randn(2, 4, 1, 8), torch.randn(2, 4, 1, 8), torch.randn(2, 4, 1, 8),
                         cu_seqlens=torch.tensor([0, 4]))
