"""Sync-free routed-expert kernel for decoding == the grouped reference."""

from __future__ import annotations

import pytest
import torch

from kimi_linear.backends import triton_interpret
from kimi_linear.ops.moe import grouped_swiglu
from kimi_linear.ops.moe_decode import moe_decode
from tests.numerics import rel_rms, tolerance


@pytest.mark.parametrize("N", [1, 5, 20])
def test_moe_decode_kernel_matches_grouped_reference(N, triton_device):
    device = triton_device
    E, D, I, k = 6, 48, 80, 2  # sizes that are not multiples of the tiles
    x = torch.randn(N, D, device=device)
    w1 = [torch.randn(I, D, device=device) / D**0.5 for _ in range(E)]
    w3 = [torch.randn(I, D, device=device) / D**0.5 for _ in range(E)]
    w2 = [torch.randn(D, I, device=device) / I**0.5 for _ in range(E)]
    indices = torch.stack([torch.randperm(E - 1, device=device)[:k] for _ in range(N)])  # expert E-1 never chosen
    weights = torch.rand(N, k, device=device)
    ref = grouped_swiglu(x, indices, weights, w1, w3, w2)
    w1[E - 1].fill_(float("nan"))  # an unchosen expert's weights must never be read
    out = moe_decode(x, indices, weights, w1, w3, w2, backend="triton")
    # two chained tf32 GEMMs (gate/up, then down) on GPU: the whole-layer tolerance, not one kernel's;
    # under the CPU interpreter the dots are true fp32 (measured ~4e-7)
    tol = tolerance("layer" if torch.cuda.is_available() else "kernel_interp", torch.float32)
    assert rel_rms(out, ref) < tol


def test_reference_path_is_grouped_swiglu():
    x = torch.randn(3, 8)
    ws = [[torch.randn(4, 8) for _ in range(3)], [torch.randn(4, 8) for _ in range(3)], [torch.randn(8, 4) for _ in range(3)]]
    idx, w = torch.tensor([[0, 2], [1, 0], [2, 1]]), torch.rand(3, 2)
    assert torch.equal(moe_decode(x, idx, w, *ws, backend="reference"), grouped_swiglu(x, idx, w, *ws))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_shared_experts_fold_into_the_same_launches(backend):
    # shared = always-on experts with weight 1: the same as routed output + a separate SwiGLU per shared expert
    if backend == "triton":
        pytest.importorskip("triton")
        if not torch.cuda.is_available() and not triton_interpret():
            pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    E, S, D, I, k, N = 5, 2, 40, 24, 2, 3
    mk = lambda *s: torch.randn(*s, device=device) / s[-1] ** 0.5  # noqa: E731
    w1, w3, w2 = [mk(I, D) for _ in range(E)], [mk(I, D) for _ in range(E)], [mk(D, I) for _ in range(E)]
    s1, s3, s2 = [mk(I, D) for _ in range(S)], [mk(I, D) for _ in range(S)], [mk(D, I) for _ in range(S)]
    x = torch.randn(N, D, device=device)
    idx = torch.stack([torch.randperm(E, device=device)[:k] for _ in range(N)])
    w = torch.rand(N, k, device=device)
    want = grouped_swiglu(x, idx, w, w1, w3, w2)
    for a, b, c in zip(s1, s3, s2):
        want = want + (torch.nn.functional.silu(x @ a.T) * (x @ b.T)) @ c.T
    got = moe_decode(x, idx, w, w1, w3, w2, shared=(s1, s3, s2), backend=backend)
    tol = 1e-12 if backend == "reference" else tolerance("layer" if torch.cuda.is_available() else "kernel_interp", torch.float32)
    assert rel_rms(got, want) < max(tol, 1e-6)
    with pytest.raises(ValueError, match="shared experts"):
        moe_decode(x, idx, w, w1, w3, w2, shared=([mk(I + 1, D)], s3[:1], s2[:1]), backend=backend)


def test_expert_weights_of_another_dtype_are_rejected(triton_device):
    device = triton_device
    x = torch.randn(2, 16, device=device)
    ws = [[torch.randn(8, 16, device=device, dtype=torch.float64)], [torch.randn(8, 16, device=device)],
          [torch.randn(16, 8, device=device)]]
    with pytest.raises(ValueError, match=r"expert weight 0 must be a contiguous torch.float32 tensor"):
        moe_decode(x, torch.zeros(2, 1, dtype=torch.long, device=device), torch.ones(2, 1, device=device), *ws,
                   backend="triton")


@pytest.mark.parametrize("shared", [0, 2])
def test_single_token_kernels_match_the_reference(shared, monkeypatch, triton_device):
    # batch-1 decoding walks the token's chosen experts (then the shared ones) by row blocks; the
    # row counts are not multiples of the tiles, and unchosen experts hold NaN, which must stay unread
    device = triton_device
    import kimi_linear.ops.moe_decode as md

    monkeypatch.setitem(md.TILES, "gate_up_one", dict(BLOCK_R=8, BLOCK_D=32, num_warps=4))
    monkeypatch.setitem(md.TILES, "down_one", dict(BLOCK_R=8, BLOCK_I=16, num_warps=4))
    E, D, I, k = 7, 72, 40, 3
    mk = lambda *s: torch.randn(*s, device=device) / s[-1] ** 0.5  # noqa: E731
    w1, w3, w2 = [mk(I, D) for _ in range(E)], [mk(I, D) for _ in range(E)], [mk(D, I) for _ in range(E)]
    sh = tuple([mk(*s) for _ in range(shared)] for s in ((I, D), (I, D), (D, I))) if shared else None
    x = torch.randn(1, D, device=device)
    idx = torch.tensor([[5, 1, 3]], device=device)
    w = torch.rand(1, k, device=device)
    want = moe_decode(x, idx, w, w1, w3, w2, shared=sh, backend="reference")
    for e in (0, 2, 4, 6):
        for t in (w1[e], w3[e], w2[e]):
            t.fill_(float("nan"))
    monkeypatch.setattr(md, "SINGLE_TOKEN_KERNELS", True)
    got = moe_decode(x, idx, w, w1, w3, w2, shared=sh, backend="triton")
    tol = tolerance("layer" if torch.cuda.is_available() else "kernel_interp", torch.float32)
    assert got.shape == (1, D) and got.dtype == x.dtype
    assert rel_rms(got, want) < tol
    assert torch.equal(moe_decode(x, idx.int(), w, w1, w3, w2, shared=sh, backend="triton"), got)  # int32 indices
    # the general (per-expert, tensor-core) kernels agree on the same token
    monkeypatch.setattr(md, "SINGLE_TOKEN_KERNELS", False)
    assert rel_rms(moe_decode(x, idx, w, w1, w3, w2, shared=sh, backend="triton"), want) < tol


def benchmark_experts(device):
    """The decode benchmark's MoE in bf16: 16 experts of 2304 -> 1024 -> 2304 and one shared expert, a
    token's top-8 choice and weights. Returns ``(w1, w3, w2, shared, indices [1, 8], weights [1, 8])``."""
    E, D, I, k = 16, 2304, 1024, 8
    mk = lambda *s: torch.randn(*s, device=device, dtype=torch.bfloat16) * s[-1] ** -0.5  # noqa: E731
    w1, w3, w2 = [mk(I, D) for _ in range(E)], [mk(I, D) for _ in range(E)], [mk(D, I) for _ in range(E)]
    sh = ([mk(I, D)], [mk(I, D)], [mk(D, I)])
    return w1, w3, w2, sh, torch.randperm(E, device=device)[:k][None], torch.rand(1, k, device=device)


@pytest.mark.gpu
def test_single_token_moe_gpu_at_the_benchmark_geometry(cuda_device):
    # the launch settings in TILES at the benchmark's geometry
    w1, w3, w2, sh, idx, w = benchmark_experts(cuda_device)
    x = torch.randn(1, w1[0].shape[1], device=cuda_device, dtype=torch.bfloat16)
    want = moe_decode(x.float(), idx, w, [t.float() for t in w1], [t.float() for t in w3], [t.float() for t in w2],
                      shared=tuple([t.float() for t in s] for s in sh), backend="reference")
    got = moe_decode(x, idx, w, w1, w3, w2, shared=sh, backend="triton")
    assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    assert rel_rms(got, want) < tolerance("layer", torch.bfloat16)


def test_a_forward_that_needs_gradients_takes_the_grouped_path(triton_device):
    # the decode kernels have no backward; with grad enabled the autograd-aware grouped path runs
    E, D, I = 3, 16, 8
    w1 = [torch.randn(I, D, requires_grad=True) for _ in range(E)]
    w3 = [torch.randn(I, D) for _ in range(E)]
    w2 = [torch.randn(D, I) for _ in range(E)]
    x = torch.randn(1, D)
    y = moe_decode(x, torch.tensor([[2]]), torch.ones(1, 1), w1, w3, w2, backend="triton")
    y.sum().backward()
    assert w1[2].grad is not None and torch.count_nonzero(w1[2].grad) > 0
    assert w1[0].grad is None or torch.count_nonzero(w1[0].grad) == 0  # expert 0 was not chosen


@pytest.mark.gpu
def test_single_token_moe_gpu_misaligned_experts(cuda_device):
    # expert weights that are views one element off a 16-byte boundary: the kernels must not be told
    # they are aligned (their loads would be vectorised on wrong addresses)
    E, D, I, k = 4, 256, 128, 2
    flat = torch.randn(3 * E * I * D + 1, device=cuda_device, dtype=torch.bfloat16) * D**-0.5
    views = flat[1:].view(3, E, I * D)
    w1 = [views[0, e].view(I, D) for e in range(E)]
    w3 = [views[1, e].view(I, D) for e in range(E)]
    w2 = [views[2, e].view(D, I) for e in range(E)]
    assert all(w.data_ptr() % 16 != 0 for w in w1)
    x = torch.randn(1, D, device=cuda_device, dtype=torch.bfloat16)
    idx = torch.tensor([[3, 1]], device=cuda_device)
    wts = torch.rand(1, k, device=cuda_device)
    want = moe_decode(x.float(), idx, wts, [w.float() for w in w1], [w.float() for w in w3], [w.float() for w in w2],
                      backend="reference")
    got = moe_decode(x, idx, wts, w1, w3, w2, backend="triton")
    assert rel_rms(got, want) < 2e-2


# ---------------------------------------------------------------- folded norm and residual
@pytest.mark.parametrize("shared", [0, 2])
def test_single_token_norm_and_residual_match_the_reference(shared, monkeypatch, triton_device):
    # the decode step's folded post-attention norm (gate/up kernel: rstd from its own D loop) and
    # residual add (down kernel's epilogue) against rms_norm -> experts -> add; the tensor-core kernels
    # and the reference path (norm and add in PyTorch) give the same
    from kimi_linear.ops.norm import rms_norm

    device = triton_device
    import kimi_linear.ops.moe_decode as md

    monkeypatch.setitem(md.TILES, "gate_up_one", dict(BLOCK_R=8, BLOCK_D=32, num_warps=4))
    monkeypatch.setitem(md.TILES, "down_one", dict(BLOCK_R=8, BLOCK_I=16, num_warps=4))
    E, D, I, k, eps = 7, 72, 40, 3, 1e-5
    mk = lambda *s: torch.randn(*s, device=device) / s[-1] ** 0.5  # noqa: E731
    w1, w3, w2 = [mk(I, D) for _ in range(E)], [mk(I, D) for _ in range(E)], [mk(D, I) for _ in range(E)]
    sh = tuple([mk(*s) for _ in range(shared)] for s in ((I, D), (I, D), (D, I))) if shared else None
    h = torch.randn(1, D, device=device) * 5.0
    nw, res = torch.rand(D, device=device) + 0.5, torch.randn(1, D, device=device)
    idx, w = torch.tensor([[5, 1, 3]], device=device), torch.rand(1, k, device=device)
    want = res + moe_decode(rms_norm(h, nw, eps), idx, w, w1, w3, w2, shared=sh, backend="reference")
    kw = dict(shared=sh, norm_weight=nw, eps=eps, residual=res)
    assert torch.equal(moe_decode(h, idx, w, w1, w3, w2, backend="reference", **kw), want)
    tol = tolerance("layer" if torch.cuda.is_available() else "kernel_interp", torch.float32)
    monkeypatch.setattr(md, "SINGLE_TOKEN_KERNELS", True)
    got = moe_decode(h, idx, w, w1, w3, w2, backend="triton", **kw)
    assert got.shape == (1, D) and got.dtype == h.dtype and rel_rms(got, want) < tol
    # each option alone
    alone = moe_decode(h, idx, w, w1, w3, w2, shared=sh, norm_weight=nw, eps=eps, backend="triton")
    assert rel_rms(alone, want - res) < tol
    alone = moe_decode(h, idx, w, w1, w3, w2, shared=sh, residual=res, backend="triton")
    assert rel_rms(alone, res + moe_decode(h, idx, w, w1, w3, w2, shared=sh, backend="reference")) < tol
    monkeypatch.setattr(md, "SINGLE_TOKEN_KERNELS", False)
    assert rel_rms(moe_decode(h, idx, w, w1, w3, w2, backend="triton", **kw), want) < tol


def test_norm_and_residual_reject_bad_input():
    x = torch.randn(2, 16)
    ws = [[torch.randn(8, 16)], [torch.randn(8, 16)], [torch.randn(16, 8)]]
    idx, w = torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1)
    with pytest.raises(ValueError, match=r"norm_weight must be a float \[D=16\]"):
        moe_decode(x, idx, w, *ws, norm_weight=torch.ones(15))
    with pytest.raises(ValueError, match=r"residual must be \[N=2, D=16\] torch.float32"):
        moe_decode(x, idx, w, *ws, residual=torch.randn(1, 16))
    with pytest.raises(ValueError, match=r"residual must be \[N=2, D=16\] torch.float32"):
        moe_decode(x, idx, w, *ws, residual=torch.randn(2, 16, dtype=torch.float64))


@pytest.mark.gpu
def test_single_token_moe_norm_and_residual_gpu_at_the_benchmark_geometry(cuda_device):
    # bf16, 16 experts top-8 + a shared one: the folded norm and residual against the fp32 reference of
    # norm -> experts -> add on the same values
    from kimi_linear.ops.norm import rms_norm

    w1, w3, w2, sh, idx, w = benchmark_experts(cuda_device)
    D = w1[0].shape[1]
    h = torch.randn(1, D, device=cuda_device, dtype=torch.bfloat16) * 4.0
    nw = (torch.rand(D, device=cuda_device) + 0.5).to(torch.bfloat16)
    res = torch.randn(1, D, device=cuda_device, dtype=torch.bfloat16)
    f = lambda ts: [t.float() for t in ts]  # noqa: E731
    want = res.float() + moe_decode(rms_norm(h.float(), nw.float(), 1e-5), idx, w, f(w1), f(w3), f(w2),
                                    shared=tuple(f(s) for s in sh), backend="reference")
    got = moe_decode(h, idx, w, w1, w3, w2, shared=sh, norm_weight=nw, eps=1e-5, residual=res, backend="triton")
    assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    assert rel_rms(got, want) < tolerance("layer", torch.bfloat16)
