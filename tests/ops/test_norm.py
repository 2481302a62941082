"""RMSNorm and the sigmoid-gated RMSNorm against their formulas."""

from __future__ import annotations

import pytest
import torch

from kimi_linear.ops.norm import gated_rms_norm, rms_norm


def test_rms_norm_formula_fp64():
    x = torch.randn(3, 7, 16, dtype=torch.float64)
    w = torch.randn(16, dtype=torch.float64)
    ref = w * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
    torch.testing.assert_close(rms_norm(x, w, 1e-5), ref, rtol=1e-12, atol=1e-12)


def test_rms_norm_bf16_rounds_before_weight():
    x = torch.randn(4, 32).bfloat16()
    w = (torch.randn(32) * 3).bfloat16()
    xf = x.float()
    expected = w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).bfloat16()
    out = rms_norm(x, w)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, expected)


def test_gated_rms_norm_formula_and_dtype():
    x = torch.randn(2, 5, 3, 8, dtype=torch.float64)
    g = torch.randn(2, 5, 3, 8, dtype=torch.float64) * 4
    w = torch.randn(8, dtype=torch.float64)
    ref = w * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * torch.sigmoid(g)
    torch.testing.assert_close(gated_rms_norm(x, g, w), ref, rtol=1e-12, atol=1e-12)
    out = gated_rms_norm(x.bfloat16(), g.bfloat16(), w.bfloat16())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_zero_input_is_finite():
    x = torch.zeros(2, 8)
    assert torch.equal(rms_norm(x, torch.ones(8)), x)
    assert torch.equal(gated_rms_norm(x, x, torch.ones(8)), x)


def test_bad_shapes():
    with pytest.raises(ValueError, match="weight must be"):
        rms_norm(torch.randn(2, 8), torch.ones(7))
    with pytest.raises(ValueError, match="gate must have"):
        gated_rms_norm(torch.randn(2, 8), torch.randn(2, 4), torch.ones(8))
