"""RMSNorm and the sigmoid-gated RMSNorm against their formulas."""

from __future__ import annotations

import pytest
import torch

from kimi_linear.ops.norm import add_rms_norm, gated_rms_norm, rms_norm, rms_norm_store_


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


def check_norm_kernel(device, dtype, shape, gated):
    """The Triton inference kernel against the PyTorch form (no grad), fresh inputs, odd widths."""
    x = torch.randn(*shape, device=device).to(dtype) * 3
    w = (torch.rand(shape[-1], device=device) + 0.5).to(dtype)
    with torch.no_grad():
        if gated:
            g = torch.randn(*shape, device=device).to(dtype)
            got = gated_rms_norm(x, g, w, 1e-6, backend="triton")
            want = gated_rms_norm(x, g, w, 1e-6, backend="reference")
        else:
            got = rms_norm(x, w, 1e-6, backend="triton")
            want = rms_norm(x, w, 1e-6, backend="reference")
    assert got.dtype == x.dtype and got.shape == x.shape
    # fp32: reduction order only; half: at most one rounding step of the output dtype
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(got.float(), want.float(), **tol)


def check_add_norm_kernel(device, dtype, shape):
    """Residual add + norm in one launch == the add, then the norm (the sum bit for bit)."""
    x, d = (torch.randn(*shape, device=device).to(dtype) * 3 for _ in range(2))
    w = (torch.rand(shape[-1], device=device) + 0.5).to(dtype)
    with torch.no_grad():
        s, y = add_rms_norm(x, d, w, 1e-6, backend="triton")
    assert s.dtype == y.dtype == dtype and s.shape == y.shape == x.shape
    assert torch.equal(s, x + d)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(y.float(), rms_norm(x + d, w, 1e-6, backend="reference").float(), **tol)


@pytest.mark.parametrize("shape", [(3, 5, 128), (1, 1, 100), (0, 64)])
def test_add_norm_kernel_interpreter(shape):
    pytest.importorskip("triton")
    if not __import__("kimi_linear.backends").backends.triton_interpret():
        pytest.skip("needs TRITON_INTERPRET=1")
    check_add_norm_kernel("cpu", torch.float32, shape)
    check_add_norm_kernel("cpu", torch.float16, shape)


def test_add_rms_norm_reference_and_bad_input():
    x, d, w = torch.randn(2, 3, 8), torch.randn(2, 3, 8), torch.rand(8) + 0.5
    s, y = add_rms_norm(x, d, w, 1e-6)
    assert torch.equal(s, x + d) and torch.equal(y, rms_norm(x + d, w, 1e-6))
    with pytest.raises(ValueError, match="delta must match x"):
        add_rms_norm(x, d[:, :2], w)
    with pytest.raises(ValueError, match="delta must match x"):
        add_rms_norm(x, d.double(), w)


@pytest.mark.parametrize("shape", [(3, 5, 128), (7, 2304), (1, 1, 100), (0, 64)])
@pytest.mark.parametrize("gated", [False, True])
def test_norm_kernel_interpreter(shape, gated):
    pytest.importorskip("triton")
    if not __import__("kimi_linear.backends").backends.triton_interpret():
        pytest.skip("needs TRITON_INTERPRET=1")
    check_norm_kernel("cpu", torch.float32, shape, gated)
    check_norm_kernel("cpu", torch.float16, shape, gated)


def test_norm_kernel_not_used_when_grad_needed():
    pytest.importorskip("triton")
    # the kernel has no backward: with requires_grad the op must stay differentiable
    x = torch.randn(4, 16, requires_grad=True)
    w = torch.ones(16, requires_grad=True)
    rms_norm(x, w, backend="triton").sum().backward()
    g = torch.randn(4, 16, requires_grad=True)
    gated_rms_norm(x, g, w, backend="triton").sum().backward()
    assert x.grad is not None and w.grad is not None and g.grad is not None


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_norm_kernel_gpu(cuda_device, dtype):
    check_norm_kernel(cuda_device, dtype, (64, 2304), False)
    check_norm_kernel(cuda_device, dtype, (64, 32, 128), True)
    check_add_norm_kernel(cuda_device, dtype, (3, 1, 2304))


def check_norm_store(device, dtype, cache_dtype, backend):
    """rms_norm_store_: token b's normalised latent lands in out[b, start[b]] and its key part in
    dst[b, start[b]], both read as column slices of one [B, 576]-like buffer; every other cache
    entry untouched; values equal rms_norm + cast (the kernel's rounding order is the op's)."""
    g = torch.Generator().manual_seed(3)
    B, L, D, E = 3, 9, 40, 12
    buf = (torch.randn(B, D + E, generator=g) * 3).to(device=device, dtype=dtype)
    x, src = buf[:, :D], buf[:, D:]
    w = (torch.rand(D, generator=g) + 0.5).to(device=device, dtype=dtype)
    start = torch.tensor([0, 8, 4], device=device)
    out = torch.full((B, L, D), float("nan"), device=device, dtype=cache_dtype)
    dst = torch.full((B, L, E), float("nan"), device=device, dtype=cache_dtype)
    rms_norm_store_(x, w, 1e-6, out, start, copy=(src, dst), backend=backend)
    want = rms_norm(x, w, 1e-6, backend="reference").to(cache_dtype)
    for b, pos in enumerate(start.tolist()):
        tol = dict(rtol=0, atol=0) if backend == "reference" else dict(rtol=2e-3, atol=2e-3)
        torch.testing.assert_close(out[b, pos].float(), want[b].float(), **tol)
        assert torch.equal(dst[b, pos], src[b].to(cache_dtype))
        others = [p for p in range(L) if p != pos]
        assert torch.isnan(out[b, others].float()).all() and torch.isnan(dst[b, others].float()).all()


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_rms_norm_store_writes_one_row_per_token(backend):
    if backend == "triton":
        pytest.importorskip("triton")
        if not __import__("kimi_linear.backends").backends.triton_interpret():
            pytest.skip("needs TRITON_INTERPRET=1")
    check_norm_store("cpu", torch.float32, torch.float32, backend)
    check_norm_store("cpu", torch.float16, torch.float32, backend)


def test_rms_norm_store_bad_input():
    x, w = torch.randn(2, 8), torch.ones(8)
    out, start = torch.zeros(2, 5, 8), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="need x"):
        rms_norm_store_(x, w, 1e-6, out[:, :, :4], start)
    with pytest.raises(ValueError, match="start must be an int tensor"):
        rms_norm_store_(x, w, 1e-6, out, start.float())
    with pytest.raises(ValueError, match="copy needs"):
        rms_norm_store_(x, w, 1e-6, out, start, copy=(torch.randn(2, 3), torch.zeros(2, 4, 3)))
    with pytest.raises(ValueError, match="start must be on x's device"):
        rms_norm_store_(x, w, 1e-6, out, start.to("meta"))
    with pytest.raises(ValueError, match="dst must be on x's device"):
        rms_norm_store_(x, w, 1e-6, out, start, copy=(torch.randn(2, 3), torch.zeros(2, 5, 3, device="meta")))
    with pytest.raises(ValueError, match="must be floating point"):
        rms_norm_store_(x, w, 1e-6, out.long(), start)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_rms_norm_store_gpu(cuda_device, dtype):
    check_norm_store(cuda_device, dtype, dtype, "triton")


def test_unknown_backend_is_rejected_for_any_input():
    for x in (torch.randn(2, 4, dtype=torch.float64), torch.randn(0, 4)):
        with pytest.raises(ValueError, match="backend"):
            rms_norm(x, torch.ones(4, dtype=x.dtype), backend="cuda")


def test_weight_and_gate_on_another_device_are_rejected():
    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match="weight must be on x's device"):
        rms_norm(x, torch.ones(4, device="meta"))
    with pytest.raises(ValueError, match="gate must have x's shape"):
        gated_rms_norm(x, torch.randn(2, 4, device="meta"), torch.ones(4))
