"""``fused_linear``: several weights sharing one input in one launch == one ``F.linear`` per weight."""

from __future__ import annotations

import pytest
import torch

from kimi_linear.backends import triton_interpret
from kimi_linear.ops.gemv import few_rows_linear, fused_linear, fused_linear_ref
from tests.numerics import rel_rms, tolerance


@pytest.mark.parametrize("N", [1, 2])
@pytest.mark.parametrize("D", [64, 72])  # a multiple of BLOCK_D and not
def test_fused_linear_matches_one_linear_per_weight(N, D, monkeypatch, triton_device):
    device = triton_device
    import kimi_linear.ops.gemv as gemv

    for kind in ("wide", "wide_few", "narrow"):
        monkeypatch.setitem(gemv.TILES, kind, dict(BLOCK_R=8, BLOCK_D=32, num_warps=2))
    ws = [torch.randn(r, D, device=device) for r in (24, 5, 1, 17)]  # blocks never span two weights
    x = torch.randn(N, D, device=device)
    got = fused_linear(x, ws, backend="triton")
    assert [tuple(y.shape) for y in got] == [(N, w.shape[0]) for w in ws]
    for y, w in zip(got, ws):
        assert y.dtype == x.dtype
        assert rel_rms(y, x.double() @ w.double().T) < tolerance("kernel_interp", torch.float32)


@pytest.mark.parametrize("N", [1, 2])
@pytest.mark.parametrize("layout", ["slices", "separate"])
def test_fused_linear_one_input_per_weight(N, layout, monkeypatch, triton_device):
    # the KDA decode step's low-rank up-projections: each weight with its own input, the inputs being
    # column slices of one earlier output (read in place, at their offsets) or separate tensors
    # (concatenated first); rows not multiples of the block, D not a multiple of BLOCK_D
    device = triton_device
    import kimi_linear.ops.gemv as gemv

    for kind in ("wide", "wide_few", "narrow"):
        monkeypatch.setitem(gemv.TILES, kind, dict(BLOCK_R=8, BLOCK_D=16, num_warps=2))
    D = 24
    ws = [torch.randn(r, D, device=device) for r in (20, 9, 33)]
    if layout == "slices":
        buf = torch.randn(N, 3 * D + 7, device=device)
        xs = [buf[:, 7 + 2 * D:], buf[:, 7:7 + D], buf[:, 7 + D:7 + 2 * D]]  # not in buffer order
    else:
        xs = [torch.randn(N, D, device=device) for _ in ws]
    got = fused_linear(xs, ws, backend="triton")
    for x, y, w in zip(xs, got, ws, strict=True):
        assert y.shape == (N, w.shape[0])
        assert rel_rms(y, x.double() @ w.double().T) < tolerance("kernel_interp", torch.float32)
    # the reference path takes lists too, and the inputs must pair with the weights
    for y, x, w in zip(fused_linear(xs, ws, backend="reference"), xs, ws, strict=True):
        assert torch.allclose(y, x @ w.T, atol=1e-5)
    with pytest.raises(ValueError, match="one input per weight"):
        fused_linear(xs[:2], ws, backend="triton")
    with pytest.raises(ValueError, match="inputs must share shape"):
        fused_linear([xs[0], torch.randn(N, D + 1, device=device), xs[2]], ws, backend="triton")


def test_fused_linear_falls_back_beyond_max_tokens_and_on_cpu():
    ws = [torch.randn(6, 8), torch.randn(3, 8)]
    x = torch.randn(9, 8)
    for got in (fused_linear(x, ws, backend="reference"), fused_linear(x, ws)):  # auto on CPU: reference
        assert all(torch.equal(a, b) for a, b in zip(got, fused_linear_ref(x, ws), strict=True))
    if triton_interpret():  # the kernel forced, but too many rows: one F.linear per weight, bit for bit
        got = fused_linear(x, ws, backend="triton")
        assert all(torch.equal(a, b) for a, b in zip(got, fused_linear_ref(x, ws), strict=True))


def test_gradients_flow_through_the_fallback(triton_device):
    # the kernel has no backward: with a gradient to carry, the autograd-aware path is taken
    ws = [torch.randn(6, 8, requires_grad=True), torch.randn(3, 8, requires_grad=True)]
    x = torch.randn(1, 8, requires_grad=True)
    a, b = fused_linear(x, ws, backend="triton")
    (a.sum() + b.sum()).backward()
    assert x.grad is not None and all(w.grad is not None for w in ws)
    torch.testing.assert_close(x.grad[0], ws[0].sum(0) + ws[1].sum(0))


def test_few_rows_linear_is_f_linear():
    x, w = torch.randn(2, 1, 8), torch.randn(5, 8)
    torch.testing.assert_close(few_rows_linear(x, w), torch.nn.functional.linear(x, w))
    x = torch.randn(7, 8)  # more rows than the kernel takes
    assert torch.equal(few_rows_linear(x, w), torch.nn.functional.linear(x, w))


def test_fused_linear_rejects_bad_input():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match=r"weight 1 must be \[R, D=8\]"):
        fused_linear(x, [torch.randn(4, 8), torch.randn(4, 7)])
    with pytest.raises(ValueError, match="weight 0 must be torch.float32"):
        fused_linear(x, [torch.randn(4, 8, dtype=torch.float64)])
    with pytest.raises(ValueError, match=r"x must be \[N, D\]"):
        fused_linear(x[None], [torch.randn(4, 8)])
    with pytest.raises(ValueError, match="at least one weight"):
        fused_linear(x, [])


@pytest.mark.gpu
@pytest.mark.parametrize("N", [1, 2])
def test_fused_linear_gpu_at_the_kda_layer_geometry(cuda_device, N):
    # a KDA layer's six input projections (hidden 2304) in bf16, against fp64 products of the same values
    ws = [torch.randn(r, 2304, device=cuda_device, dtype=torch.bfloat16) * 2304**-0.5
          for r in (4096, 4096, 4096, 128, 128, 32)]
    x = torch.randn(N, 2304, device=cuda_device, dtype=torch.bfloat16)
    for y, w in zip(fused_linear(x, ws), ws, strict=True):
        assert y.shape == (N, w.shape[0]) and torch.isfinite(y).all()
        assert rel_rms(y, x.double() @ w.double().T) < tolerance("kernel_fwd", torch.bfloat16)


@pytest.mark.gpu
def test_fused_linear_gpu_misaligned_weights_and_inputs(cuda_device):
    # the kernel is told the weights' (and per-weight inputs') alignment so that it vectorises their
    # loads; a weight or input that is a view one element off a 16-byte boundary must take the
    # unaligned path and give the same products
    D = 2304
    flat = torch.randn(4096 * D + 1, device=cuda_device, dtype=torch.bfloat16) * D**-0.5
    ws = [flat[1:1 + 4096 * D].view(4096, D), torch.randn(128, D, device=cuda_device, dtype=torch.bfloat16)]
    assert ws[0].data_ptr() % 16 != 0
    x = torch.randn(1, D, device=cuda_device, dtype=torch.bfloat16)
    for y, w in zip(fused_linear(x, ws), ws, strict=True):
        assert rel_rms(y, x.double() @ w.double().T) < tolerance("kernel_fwd", torch.bfloat16)
    buf = torch.randn(1, 2 * D + 1, device=cuda_device, dtype=torch.bfloat16)
    xs = [buf[:, 1:1 + D], buf[:, 1 + D:]]
    for y, xi, w in zip(fused_linear(xs, ws), xs, ws, strict=True):
        assert rel_rms(y, xi.double() @ w.double().T) < tolerance("kernel_fwd", torch.bfloat16)


# the default narrow / wide_few / wide tiles (FEW_ROWS lowered so that 29 rows are "many"), widths
# below their slices
@pytest.mark.parametrize("D,few_rows", [(40, None), (300, None), (300, 16)])
def test_fused_linear_default_tiles_on_odd_widths(D, few_rows, triton_device, monkeypatch):
    device = triton_device
    import kimi_linear.ops.gemv as gemv

    if few_rows is not None:
        monkeypatch.setattr(gemv, "FEW_ROWS", few_rows)
    assert gemv._tiles_class(D, 29) == ("narrow" if D <= 256 else "wide" if few_rows else "wide_few")
    ws = [torch.randn(r, D, device=device) for r in (9, 20)]
    x = torch.randn(1, D, device=device)
    for y, w in zip(fused_linear(x, ws, backend="triton"), ws, strict=True):
        assert rel_rms(y, x.double() @ w.double().T) < tolerance("kernel_interp", torch.float32)
    # the folded norm's own tiles (NORM_TILES) where a class has them
    from kimi_linear.ops.norm import rms_norm

    nw = torch.rand(D, device=device) + 0.5
    for y, w in zip(fused_linear(x, ws, norm_weight=nw, backend="triton"), ws, strict=True):
        assert rel_rms(y, rms_norm(x, nw).double() @ w.double().T) < tolerance("kernel_interp", torch.float32)


@pytest.mark.parametrize("N", [1, 2])
def test_fused_linear_conv_steps_match_linear_then_conv(N, monkeypatch, triton_device):
    # outputs 0 and 2 go through a short-conv step (+ SiLU) with their windows shifted in place; row
    # counts not multiples of the block, so blocks end inside a weight
    device = triton_device
    import kimi_linear.ops.gemv as gemv
    from kimi_linear.ops.conv import causal_conv1d_update

    for kind in ("wide", "wide_few", "narrow"):
        monkeypatch.setitem(gemv.TILES, kind, dict(BLOCK_R=8, BLOCK_D=32, num_warps=2))
    D, W = 40, 4
    ws = [torch.randn(r, D, device=device) for r in (20, 5, 12)]
    x = torch.randn(N, D, device=device)
    windows = {i: torch.randn(N, ws[i].shape[0], W - 1, device=device) for i in (0, 2)}
    cws = {i: torch.randn(ws[i].shape[0], W, device=device) for i in (0, 2)}
    want, want_windows = [x @ w.T for w in ws], {}
    for i in (0, 2):
        want[i], want_windows[i] = causal_conv1d_update(want[i], windows[i], cws[i][:, None, :], activation="silu")
    steps = [(windows[0], cws[0]), None, (windows[2], cws[2])]
    got = fused_linear(x, ws, conv_steps=steps, backend="triton")
    for i in range(3):
        assert rel_rms(got[i], want[i]) < tolerance("kernel_interp", torch.float32), i
    for i in (0, 2):
        assert rel_rms(windows[i], want_windows[i]) < tolerance("kernel_interp", torch.float32), i


def test_fused_linear_conv_steps_reference_path_and_bad_input():
    from kimi_linear.ops.conv import causal_conv1d_update

    x, w = torch.randn(3, 8), torch.randn(6, 8)  # 3 rows > MAX_TOKENS: the reference path
    window, cw = torch.randn(3, 6, 3), torch.randn(6, 4)
    want, want_window = causal_conv1d_update(x @ w.T, window.clone(), cw[:, None, :], activation="silu")
    (got,) = fused_linear(x, [w], conv_steps=[(window, cw)])
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(window, want_window)
    with pytest.raises(ValueError, match="one entry"):
        fused_linear(x, [w], conv_steps=[])
    with pytest.raises(ValueError, match=r"conv step 0: need window"):
        fused_linear(x, [w], conv_steps=[(torch.randn(3, 5, 3), cw)])


@pytest.mark.gpu
@pytest.mark.parametrize("N", [1, 2])
def test_fused_linear_conv_steps_gpu_at_the_kda_layer_geometry(cuda_device, N):
    # q, k, v with their conv steps in bf16 against cuBLAS + the separate conv-step kernel
    from kimi_linear.ops.conv import causal_conv1d_update_

    mk = lambda *s: torch.randn(*s, device=cuda_device, dtype=torch.bfloat16)  # noqa: E731
    ws = [mk(r, 2304) * 2304**-0.5 for r in (4096, 4096, 4096, 128, 128, 32)]
    x = mk(N, 2304)
    windows = [mk(N, 4096, 3) for _ in range(3)]
    cws = [mk(4096, 4) * 0.5 for _ in range(3)]
    want_windows = [w.clone() for w in windows]
    want = [torch.nn.functional.linear(x, w) for w in ws]
    for i in range(3):
        want[i] = causal_conv1d_update_(want[i], want_windows[i], cws[i][:, None, :], activation="silu")
    got = fused_linear(x, ws, conv_steps=[*zip(windows, cws), None, None, None])
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert torch.isfinite(g).all() and rel_rms(g, w) < tolerance("kernel_fwd", torch.bfloat16), i
    for a, b in zip(windows, want_windows, strict=True):
        # the appended column is the bf16 projection, which cuBLAS and the kernel may round differently
        assert torch.equal(a[..., :2], b[..., :2]) and rel_rms(a[..., 2], b[..., 2]) < 1e-2


# ---------------------------------------------------------------- folded norm and residual epilogues
def _small_tiles(monkeypatch, block_d=32):
    import kimi_linear.ops.gemv as gemv

    for kind in ("wide", "wide_few", "narrow"):
        monkeypatch.setitem(gemv.TILES, kind, dict(BLOCK_R=8, BLOCK_D=block_d, num_warps=2))


@pytest.mark.parametrize("N", [1, 2])
@pytest.mark.parametrize("conv", [False, True])
def test_fused_linear_norm_matches_rms_norm_then_linear(N, conv, monkeypatch, triton_device):
    # x un-normalised (scaled so that rstd is far from 1), D not a multiple of BLOCK_D: the products
    # of rms_norm(x, w) -- and, with conv steps on outputs 0 and 2, their conv step on the normed products
    from kimi_linear.ops.conv import causal_conv1d_update
    from kimi_linear.ops.norm import rms_norm

    device = triton_device
    _small_tiles(monkeypatch)
    D, W, eps = 72, 4, 1e-5
    ws = [torch.randn(r, D, device=device) for r in (20, 5, 12)]
    x = torch.randn(N, D, device=device) * 7.0
    nw = torch.rand(D, device=device) + 0.5
    want = [rms_norm(x, nw, eps) @ w.T for w in ws]
    steps = None
    if conv:
        windows = {i: torch.randn(N, ws[i].shape[0], W - 1, device=device) for i in (0, 2)}
        cws = {i: torch.randn(ws[i].shape[0], W, device=device) for i in (0, 2)}
        want_windows = {}
        for i in (0, 2):
            want[i], want_windows[i] = causal_conv1d_update(want[i], windows[i], cws[i][:, None, :], activation="silu")
        steps = [(windows[0], cws[0]), None, (windows[2], cws[2])]
    got = fused_linear(x, ws, conv_steps=steps, norm_weight=nw, eps=eps, backend="triton")
    for i in range(3):
        assert got[i].shape == (N, ws[i].shape[0]) and got[i].dtype == x.dtype
        assert rel_rms(got[i], want[i]) < tolerance("kernel_interp", torch.float32), i
    if conv:
        for i in (0, 2):
            assert rel_rms(windows[i], want_windows[i]) < tolerance("kernel_interp", torch.float32), i


@pytest.mark.parametrize("N", [1, 2])
def test_fused_linear_residual_is_added_after_rounding(N, monkeypatch, triton_device):
    # y = residual + x W^T for every weight, the residual's columns in the weights' order; with the
    # norm too; few_rows_linear takes the residual of its output's shape
    from kimi_linear.ops.norm import rms_norm

    device = triton_device
    _small_tiles(monkeypatch)
    D = 40
    ws = [torch.randn(r, D, device=device) for r in (9, 20)]
    x = torch.randn(N, D, device=device)
    res = torch.randn(N, 29, device=device)
    got = fused_linear(x, ws, residual=res, backend="triton")
    assert rel_rms(torch.cat(got, 1), res + torch.cat([x @ w.T for w in ws], 1)) < tolerance("kernel_interp", torch.float32)
    nw = torch.rand(D, device=device) + 0.5
    got = fused_linear(x, ws, norm_weight=nw, eps=1e-6, residual=res, backend="triton")
    want = res + torch.cat([rms_norm(x, nw) @ w.T for w in ws], 1)
    assert rel_rms(torch.cat(got, 1), want) < tolerance("kernel_interp", torch.float32)
    x3, r3 = torch.randn(N, 1, D, device=device), torch.randn(N, 1, 9, device=device)
    y = few_rows_linear(x3, ws[0], residual=r3, backend="triton")
    assert y.shape == (N, 1, 9) and rel_rms(y, r3 + x3 @ ws[0].T) < tolerance("kernel_interp", torch.float32)


def test_fused_linear_norm_and_residual_reference_path():
    # on CPU (auto) and beyond MAX_TOKENS: the norm, the products and the add apart, bit for bit
    from kimi_linear.ops.norm import rms_norm

    ws = [torch.randn(6, 8), torch.randn(3, 8)]
    nw, res = torch.rand(8) + 0.5, torch.randn(5, 9)
    for x in (torch.randn(1, 8), torch.randn(5, 8)):
        r = res[: x.shape[0]]
        got = fused_linear(x, ws, norm_weight=nw, eps=1e-5, residual=r)
        normed = rms_norm(x, nw, 1e-5)
        assert torch.equal(got[0], r[:, :6] + normed @ ws[0].T) and torch.equal(got[1], r[:, 6:] + normed @ ws[1].T)
    x, r = torch.randn(7, 8), torch.randn(7, 6)  # few_rows_linear beyond the kernel's rows
    assert torch.equal(few_rows_linear(x, ws[0], residual=r), r + torch.nn.functional.linear(x, ws[0]))


def test_fused_linear_norm_and_residual_reject_bad_input():
    x, ws = torch.randn(2, 8), [torch.randn(4, 8), torch.randn(3, 8)]
    with pytest.raises(ValueError, match=r"residual must be \[N=2, OUT=7\]"):
        fused_linear(x, ws, residual=torch.randn(2, 4))
    with pytest.raises(ValueError, match="residual must be torch.float32"):
        fused_linear(x, ws, residual=torch.randn(2, 7, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"norm_weight must be \[D=8\]"):
        fused_linear(x, ws, norm_weight=torch.ones(7))
    with pytest.raises(ValueError, match="norm_weight needs one shared input tensor"):
        fused_linear([x, x], ws, norm_weight=torch.ones(8))
    with pytest.raises(ValueError, match=r"residual must be \(2, 4\)"):
        few_rows_linear(x, ws[0], residual=torch.randn(2, 3))


@pytest.mark.gpu
@pytest.mark.parametrize("N", [1, 2])
def test_fused_linear_norm_and_residual_gpu_at_the_model_geometry(cuda_device, N):
    # bf16, hidden 2304: a KDA layer's input launch with the block's norm folded in (conv steps on q, k,
    # v) against the norm kernel + cuBLAS + the conv-step kernel; an output projection (4096 -> 2304)
    # with the residual in its epilogue against cuBLAS + the add
    from kimi_linear.ops.conv import causal_conv1d_update_
    from kimi_linear.ops.norm import rms_norm

    mk = lambda *s: torch.randn(*s, device=cuda_device, dtype=torch.bfloat16)  # noqa: E731
    ws = [mk(r, 2304) * 2304**-0.5 for r in (4096, 4096, 4096, 128, 128, 32)]
    h = mk(N, 2304) * 4.0
    nw = (torch.rand(2304, device=cuda_device) + 0.5).to(torch.bfloat16)
    windows = [mk(N, 4096, 3) for _ in range(3)]
    cws = [mk(4096, 4) * 0.5 for _ in range(3)]
    want_windows = [w.clone() for w in windows]
    normed = rms_norm(h, nw, 1e-5)
    want = [torch.nn.functional.linear(normed, w) for w in ws]
    for i in range(3):
        want[i] = causal_conv1d_update_(want[i], want_windows[i], cws[i][:, None, :], activation="silu")
    got = fused_linear(h, ws, conv_steps=[*zip(windows, cws), None, None, None], norm_weight=nw, eps=1e-5)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert torch.isfinite(g).all() and rel_rms(g, w) < tolerance("kernel_fwd", torch.bfloat16), i
    for a, b in zip(windows, want_windows, strict=True):
        assert torch.equal(a[..., :2], b[..., :2]) and rel_rms(a[..., 2], b[..., 2]) < 2e-2
    o, w_o = mk(N, 4096), mk(2304, 4096) * 4096**-0.5
    res = mk(N, 2304)
    (y,) = fused_linear(o, [w_o], residual=res)
    assert y.dtype == torch.bfloat16 and rel_rms(y, res.double() + o.double() @ w_o.double().T) < tolerance(
        "kernel_fwd", torch.bfloat16)
