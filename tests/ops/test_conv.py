"""Causal depthwise short conv: definition, continuation from a window, decode step, varlen, causality."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kimi_linear.ops.conv import causal_conv1d, causal_conv1d_update, causal_conv1d_update_


def conv_by_definition(x, weight, window=None, act=True):
    """y[t] = sum_j w[W-1-j] * x[t-j], reading the window before t = 0 (fp64 loop)."""
    B, T, D = x.shape
    W = weight.shape[-1]
    w = weight.reshape(D, W)
    prev = torch.zeros(B, D, W - 1, dtype=x.dtype) if window is None else window
    full = torch.cat([prev, x.transpose(1, 2)], dim=-1)  # [B, D, W-1+T]
    y = torch.zeros(B, T, D, dtype=x.dtype)
    for t in range(T):
        for j in range(W):
            y[:, t] += w[:, W - 1 - j] * full[:, :, W - 1 + t - j]
    return F.silu(y) if act else y


@pytest.mark.parametrize("W", [1, 2, 4])
@pytest.mark.parametrize("act", [True, False])
def test_matches_definition(W, act):
    x = torch.randn(2, 9, 5, dtype=torch.float64)
    w = torch.randn(5, 1, W, dtype=torch.float64)
    win = torch.randn(2, 5, W - 1, dtype=torch.float64)
    y, final = causal_conv1d(x, w, activation="silu" if act else None, output_final_window=True)
    torch.testing.assert_close(y, conv_by_definition(x, w, act=act), rtol=1e-12, atol=1e-12)
    assert final.shape == (2, 5, W - 1)
    y2, _ = causal_conv1d(x, w, activation="silu" if act else None, initial_window=win)
    torch.testing.assert_close(y2, conv_by_definition(x, w, win, act=act), rtol=1e-12, atol=1e-12)


def test_split_prefill_and_decode_steps_equal_full():
    x = torch.randn(3, 11, 6, dtype=torch.float64)
    w = torch.randn(6, 1, 4, dtype=torch.float64)
    full, _ = causal_conv1d(x, w)
    a, win = causal_conv1d(x[:, :2], w, output_final_window=True)  # shorter than W-1: window mixes zeros
    b, win = causal_conv1d(x[:, 2:7], w, initial_window=win, output_final_window=True)
    outs = [a, b]
    for t in range(7, 11):
        y, win = causal_conv1d_update(x[:, t], win, w)
        outs.append(y[:, None])
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(win, x[:, -3:].transpose(1, 2))


def test_update_does_not_modify_window_and_accepts_3d():
    x = torch.randn(2, 1, 4)
    w = torch.randn(4, 3)
    win = torch.randn(2, 4, 2)
    before = win.clone()
    y, new = causal_conv1d_update(x, win, w)
    assert y.shape == (2, 1, 4) and torch.equal(win, before)
    torch.testing.assert_close(new[..., -1], x[:, 0])


def test_varlen_equals_separate_sequences():
    D, W = 5, 4
    lens = [3, 0, 1, 7, 2]
    w = torch.randn(D, 1, W, dtype=torch.float64)
    seqs = [torch.randn(1, n, D, dtype=torch.float64) for n in lens]
    wins = torch.randn(len(lens), D, W - 1, dtype=torch.float64)
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
    packed = torch.cat(seqs, dim=1)
    for use_win in (False, True):
        y, finals = causal_conv1d(packed, w, cu_seqlens=cu, initial_window=wins if use_win else None,
                                  output_final_window=True)
        for n, s in enumerate(seqs):
            ref, ref_final = causal_conv1d(s, w, initial_window=wins[n:n + 1] if use_win else None,
                                           output_final_window=True)
            torch.testing.assert_close(y[:, cu[n]:cu[n + 1]], ref, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(finals[n:n + 1], ref_final, rtol=1e-12, atol=1e-12)


def test_causal_exactly():
    x = torch.randn(1, 10, 3)
    w = torch.randn(3, 1, 4)
    y, _ = causal_conv1d(x, w)
    x2 = x.clone()
    x2[:, 6:] = torch.randn(1, 4, 3) * 100
    y2, _ = causal_conv1d(x2, w)
    assert torch.equal(y[:, :6], y2[:, :6])
    assert not torch.equal(y[:, 6:], y2[:, 6:])


def test_bad_inputs():
    x = torch.randn(2, 5, 4)
    with pytest.raises(ValueError, match="x's channel dim 4"):
        causal_conv1d(x, torch.randn(3, 1, 4))
    with pytest.raises(ValueError, match="initial_window must be"):
        causal_conv1d(x, torch.randn(4, 1, 4), initial_window=torch.zeros(2, 4, 2))
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d(x, torch.randn(4, 1, 4), activation="gelu")
    with pytest.raises(ValueError, match="batch must be 1"):
        causal_conv1d(x, torch.randn(4, 1, 4), cu_seqlens=torch.tensor([0, 5], dtype=torch.int32))
    with pytest.raises(ValueError, match="window must be"):
        causal_conv1d_update(x[:, 0], torch.zeros(2, 4, 1), torch.randn(4, 4))


def check_inplace_update(device, dtype, B, D, W, bias, act, strided):
    """The in-place step (Triton on ``device``) against the PyTorch step: same y (one rounding apart
    in half precision), window shifted exactly, over several steps on fresh inputs."""
    gen = torch.Generator().manual_seed(B * 1000 + D * 10 + W)
    r = lambda *s: torch.randn(*s, generator=gen).to(device=device, dtype=dtype)  # noqa: E731
    w = r(D, 1, W)
    b = r(D) if bias else None
    win = r(B, D, W - 1)
    win_ref = win.clone()
    tol = dict(rtol=0, atol=0) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for _ in range(W + 1):  # more steps than the window is long: every entry gets replaced
        big = r(B, 3 * D)
        x = big[:, D:2 * D] if strided else big[:, :D].contiguous()  # a slice of a fused projection
        y = causal_conv1d_update_(x, win, w, b, activation="silu" if act else None, backend="triton")
        y_ref, win_ref = causal_conv1d_update(x, win_ref, w, b, activation="silu" if act else None)
        assert y.dtype == x.dtype and y.shape == (B, D)
        torch.testing.assert_close(y.float(), y_ref.float(), **(tol if dtype != torch.float32 else dict(rtol=1e-5, atol=1e-5)))
        assert torch.equal(win, win_ref)  # the shift is a copy: bit-exact


@pytest.mark.parametrize("D,W,bias,act,strided", [(6, 4, False, True, False), (300, 4, True, True, True),
                                                   (130, 3, False, False, True), (5, 2, True, True, False)])
def test_inplace_update_triton_interpreter(D, W, bias, act, strided):
    pytest.importorskip("triton")
    check_inplace_update("cpu", torch.float32, 3, D, W, bias, act, strided)


def test_inplace_update_triton_interpreter_half():
    pytest.importorskip("triton")
    check_inplace_update("cpu", torch.float16, 2, 200, 4, False, True, True)


def test_inplace_update_reference_backend_and_bad_inputs():
    x = torch.randn(2, 1, 4)
    w = torch.randn(4, 1, 3)
    win = torch.randn(2, 4, 2)
    y_ref, new = causal_conv1d_update(x, win, w)
    y = causal_conv1d_update_(x, win, w, backend="reference")
    assert y.shape == (2, 1, 4) and torch.equal(y, y_ref) and torch.equal(win, new)
    before = win.clone()
    with pytest.raises(ValueError, match="window must be"):
        causal_conv1d_update_(x, torch.zeros(2, 4, 1), w)
    with pytest.raises(ValueError, match="x must be"):
        causal_conv1d_update_(torch.randn(2, 2, 4), win, w)
    with pytest.raises(ValueError, match="window must be on x's device"):
        causal_conv1d_update_(x, torch.zeros(2, 4, 2, device="meta"), w)
    assert torch.equal(win, before)  # a rejected call leaves the window alone


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_inplace_update_triton_gpu(cuda_device, dtype):
    check_inplace_update(cuda_device, dtype, 64, 4096, 4, False, True, True)


def check_sequence_kernel(device, dtype, B, T, D, W, window, bias, act, strided, final=True):
    """The whole-sequence Triton kernel against the PyTorch form on fresh random inputs (y and final window)."""
    gen = torch.Generator().manual_seed(T * 1000 + D * 10 + W)
    base = torch.randn(B, T, 2 * D if strided else D, generator=gen).to(device=device, dtype=dtype)
    x = base[..., :D] if strided else base  # rows strided as a slice of a wider projection gives them
    w = (torch.randn(D, 1, W, generator=gen) / W).to(device=device, dtype=dtype)
    b = torch.randn(D, generator=gen).to(device=device, dtype=dtype) if bias else None
    win = torch.randn(B, D, W - 1, generator=gen).to(device=device, dtype=dtype) if window else None
    a = "silu" if act else None
    y, fin = causal_conv1d(x, w, b, activation=a, initial_window=win, output_final_window=final, backend="triton")
    y_ref, fin_ref = causal_conv1d(x.float(), w.float(), None if b is None else b.float(), activation=a,
                                   initial_window=None if win is None else win.float(),
                                   output_final_window=final, backend="reference")
    assert y.dtype == dtype and y.shape == (B, T, D)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(y.float(), y_ref, **tol)
    if final:
        assert fin.dtype == dtype and fin.shape == (B, D, W - 1)
        assert torch.equal(fin.float(), fin_ref.to(dtype).float())  # a copy of inputs: exact
    else:
        assert fin is None


@pytest.mark.parametrize("T,D,W,window,bias,act,strided", [
    (37, 6, 4, False, False, True, False),    # several token blocks, no window
    (70, 130, 4, True, False, True, True),    # window, channel blocks, strided rows
    (2, 5, 4, True, True, False, False),      # shorter than the window: the final window mixes both
    (0, 7, 3, True, False, True, False),      # no tokens: the window passes through
    (9, 3, 2, False, True, True, True),
])
def test_sequence_triton_interpreter(T, D, W, window, bias, act, strided):
    pytest.importorskip("triton")
    check_sequence_kernel("cpu", torch.float32, 2, T, D, W, window, bias, act, strided)


def test_sequence_triton_interpreter_half_no_final():
    pytest.importorskip("triton")
    check_sequence_kernel("cpu", torch.float16, 1, 40, 64, 4, True, False, True, False, final=False)


def test_sequence_triton_is_causal_and_continues_chunked():
    """Changing future tokens never changes earlier outputs; two chunks through the carried window equal
    one call (the kernel on both sides)."""
    pytest.importorskip("triton")
    x = torch.randn(1, 50, 8)
    w = torch.randn(8, 1, 4)
    y, _ = causal_conv1d(x, w, backend="triton")
    x2 = x.clone()
    x2[:, 30:] = torch.randn(1, 20, 8) * 100  # large: SiLU must stay finite
    y2, _ = causal_conv1d(x2, w, backend="triton")
    assert torch.isfinite(y2).all()
    assert torch.equal(y[:, :30], y2[:, :30]) and not torch.allclose(y[:, 30:], y2[:, 30:])
    a, win = causal_conv1d(x[:, :21], w, output_final_window=True, backend="triton")
    b, _ = causal_conv1d(x[:, 21:], w, initial_window=win, backend="triton")
    torch.testing.assert_close(torch.cat([a, b], 1), y, rtol=1e-6, atol=1e-6)


def test_sequence_with_gradient_takes_the_differentiable_form():
    """Training needs gradients: with inputs that require them, ``auto`` keeps the PyTorch form on any device."""
    x = torch.randn(1, 6, 4, requires_grad=True)
    w = torch.randn(4, 1, 4, requires_grad=True)
    y, _ = causal_conv1d(x, w)
    y.sum().backward()
    assert x.grad is not None and w.grad is not None
    with pytest.raises(ValueError, match="initial_window must be on x's device"):
        causal_conv1d(x.detach(), w.detach(), initial_window=torch.zeros(1, 4, 3, device="meta"))
    with pytest.raises(ValueError, match=r"bias must be \[D\] = \(4,\), got \(3,\)"):
        causal_conv1d(x.detach(), w.detach(), torch.zeros(3))  # checked before either form runs


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_sequence_triton_gpu(cuda_device, dtype):
    check_sequence_kernel(cuda_device, dtype, 2, 4100, 4096, 4, True, False, True, True)
    check_sequence_kernel(cuda_device, dtype, 1, 3, 4096, 4, True, False, True, False)
