"""Sampling: filters keep exactly what they should; seeded sampling is reproducible; greedy is argmax."""

from __future__ import annotations

import pytest
import torch

from kimi_linear.generation.sampling import (
    SamplingConfig,
    apply_repetition_penalty,
    mark_seen,
    next_token,
    top_k_filter,
    top_p_filter,
)


def test_greedy_is_argmax():
    logits = torch.randn(4, 50)
    assert torch.equal(next_token(logits, SamplingConfig()), logits.argmax(-1))


def test_top_k_keeps_k_largest():
    logits = torch.randn(3, 40)
    out = top_k_filter(logits, 5)
    kept = torch.isfinite(out)
    assert kept.sum(-1).tolist() == [5, 5, 5]
    assert torch.equal(kept, logits >= logits.topk(5, -1).values[:, -1:])
    assert torch.equal(out[kept], logits[kept])


def test_top_p_smallest_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    assert torch.isfinite(top_p_filter(logits, 0.5)).tolist() == [[True, False, False, False]]
    assert torch.isfinite(top_p_filter(logits, 0.79)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(top_p_filter(logits, 0.81)).tolist() == [[True, True, True, False]]
    # permuted vocabulary: same set, in place
    perm = torch.randperm(4)
    assert torch.equal(torch.isfinite(top_p_filter(logits[:, perm], 0.79)), torch.isfinite(top_p_filter(logits, 0.79))[:, perm])
    assert torch.isfinite(top_p_filter(logits, 0.01)).sum() == 1  # never empty


def test_repetition_penalty():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    seen = torch.tensor([[True, True, False]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0]]
    # greedy with the penalty switches away from a repeated token
    cfg = SamplingConfig(repetition_penalty=3.0)
    assert next_token(torch.tensor([[3.0, 2.0]]), cfg, seen=torch.tensor([[True, False]])).item() == 1
    with pytest.raises(ValueError, match="seen"):
        next_token(logits, cfg)


def test_mark_seen():
    seen = torch.zeros(2, 6, dtype=torch.bool)
    mark_seen(seen, torch.tensor([[1, 1, 4], [0, 5, 2]]), torch.tensor([[1, 1, 0], [1, 1, 1]]))
    assert seen.nonzero().tolist() == [[0, 1], [1, 0], [1, 2], [1, 5]]
    mark_seen(seen, torch.tensor([3, 3]))
    assert seen[:, 3].all()


def test_seeded_sampling_reproducible_and_respects_filters():
    logits = torch.randn(8, 100)
    cfg = SamplingConfig(do_sample=True, temperature=0.7, top_k=10, top_p=0.9)
    a = [next_token(logits, cfg, generator=torch.Generator().manual_seed(5)) for _ in range(2)]
    assert torch.equal(a[0], a[1])
    allowed = torch.isfinite(top_p_filter(top_k_filter(logits / 0.7, 10), 0.9))
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        tok = next_token(logits, cfg, generator=g)
        assert allowed.gather(1, tok[:, None]).all()


def test_sampling_distribution_matches_softmax():
    logits = torch.tensor([[0.0, 1.0, 2.0]]).expand(20000, 3)
    tok = next_token(logits, SamplingConfig(do_sample=True), generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(tok, minlength=3).float() / tok.numel()
    assert torch.allclose(freq, torch.softmax(logits[0], -1), atol=0.015)


def test_bad_config():
    for kw in ({"temperature": 0.0}, {"top_k": -1}, {"top_p": 0.0}, {"top_p": 1.5}, {"repetition_penalty": 0.0}):
        with pytest.raises(ValueError):
            SamplingConfig(**kw)
