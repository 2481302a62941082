"""Short conv continuing from a cached window == the conv of the whole sequence."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kimi_linear.ops.conv_step import causal_conv1d_with_window


def full_conv(x, w):
    T = x.shape[1]
    return F.silu(F.conv1d(x.transpose(1, 2), w.unsqueeze(1), padding=w.shape[1] - 1, groups=x.shape[2])[..., :T]).transpose(1, 2)


@pytest.mark.parametrize("pieces", [[9], [1] * 9, [3, 1, 5], [2, 2, 1, 4]])
def test_pieces_equal_whole(pieces):
    x = torch.randn(2, 9, 6, dtype=torch.float64)
    w = torch.randn(6, 4, dtype=torch.float64)
    ref = full_conv(x, w)
    window = torch.zeros(2, 6, 3, dtype=torch.float64)
    outs, t = [], 0
    for n in pieces:
        outs.append(causal_conv1d_with_window(x[:, t:t + n], w, window))
        t += n
    assert torch.allclose(torch.cat(outs, 1), ref, atol=1e-12)
    assert torch.equal(window, x[:, -3:].transpose(1, 2))


def test_short_first_piece_keeps_zero_history():
    x = torch.randn(1, 2, 3)
    w = torch.randn(3, 1, 4)
    window = torch.zeros(1, 3, 3)
    causal_conv1d_with_window(x, w, window)
    assert torch.equal(window[..., 0], torch.zeros(1, 3)) and torch.equal(window[..., 1:], x.transpose(1, 2))


def test_bad_shapes():
    with pytest.raises(ValueError, match="window"):
        causal_conv1d_with_window(torch.randn(1, 2, 3), torch.randn(3, 4), torch.zeros(2, 3, 3))
    with pytest.raises(ValueError, match="weight"):
        causal_conv1d_with_window(torch.randn(1, 2, 3), torch.randn(5, 4), torch.zeros(1, 3, 3))
