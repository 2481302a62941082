"""MoE routing and grouped expert compute against brute-force references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kimi_linear.ops.moe import expert_load, grouped_swiglu, route, route_tokens


def route_brute_force(logits, bias, k, scaling, groups=1, topk_groups=1):
    """Per token: pick by biased sigmoid score (within the best groups), weight by unbiased scores."""
    N, E = logits.shape
    w_out, i_out = [], []
    for n in range(N):
        s = torch.sigmoid(logits[n].double())
        c = s + bias.double()
        allowed = list(range(E))
        if groups > 1:
            per = E // groups
            gscore = [sorted(c[g * per:(g + 1) * per].tolist(), reverse=True)[:2] for g in range(groups)]
            best = sorted(range(groups), key=lambda g: -sum(gscore[g]))[:topk_groups]
            allowed = [e for e in range(E) if e // per in best]
        chosen = sorted(allowed, key=lambda e: -c[e].item())[:k]
        w = s[chosen] / s[chosen].sum() * scaling
        order = torch.argsort(torch.tensor(chosen))
        i_out.append(torch.tensor(chosen)[order])
        w_out.append(w[order])
    return torch.stack(w_out), torch.stack(i_out)


def _sorted(w, i):
    order = torch.argsort(i, dim=-1)
    return w.gather(1, order), i.gather(1, order)


@pytest.mark.parametrize("groups,topk_groups", [(1, 1), (4, 2)])
def test_route_matches_brute_force(groups, topk_groups):
    logits = torch.randn(13, 16)
    bias = torch.randn(16) * 0.3  # large enough to change choices
    w, i = route(logits, bias, 3, num_groups=groups, topk_groups=topk_groups, scaling=2.5)
    rw, ri = route_brute_force(logits, bias, 3, 2.5, groups, topk_groups)
    w, i = _sorted(w, i)
    assert torch.equal(i, ri)
    torch.testing.assert_close(w.double(), rw, rtol=1e-6, atol=1e-6)
    assert w.dtype == torch.float32


def test_bias_changes_choice_not_weight_formula():
    logits = torch.zeros(4, 8)
    logits[:, 0] = 5.0
    bias = torch.zeros(8)
    bias[0] = -10.0  # expert 0 has the best score but is never chosen
    w, i = route(logits, bias, 2, renormalize=False)
    assert not (i == 0).any()
    torch.testing.assert_close(w, torch.full((4, 2), 0.5))  # sigmoid(0), unbiased


def test_grouped_swiglu_equals_dense_reference_with_grads():
    E, D, I, N, k = 6, 8, 12, 20, 2
    x = torch.randn(N, D, dtype=torch.float64, requires_grad=True)
    w1 = [torch.randn(I, D, dtype=torch.float64, requires_grad=True) for _ in range(E)]
    w3 = [torch.randn(I, D, dtype=torch.float64, requires_grad=True) for _ in range(E)]
    w2 = [torch.randn(D, I, dtype=torch.float64, requires_grad=True) for _ in range(E)]
    idx = torch.stack([torch.randperm(E - 1)[:k] for _ in range(N)])  # expert E-1 never used
    wts = torch.rand(N, k, dtype=torch.float64)
    out = grouped_swiglu(x, idx, wts, w1, w3, w2)
    ref = torch.zeros(N, D, dtype=torch.float64)
    for n in range(N):
        for s in range(k):
            e = idx[n, s]
            ref[n] += wts[n, s] * (F.silu(w1[e] @ x[n]) * (w3[e] @ x[n])) @ w2[e].T
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(ref)
    got = torch.autograd.grad(out, [x, w1[0], w2[3]], g)
    want = torch.autograd.grad(ref, [x, w1[0], w2[3]], g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def check_grouped_mm_path(device, dtype, E, D, I, N, k, unused=()):
    """The grouped-GEMM experts (forced) against the per-expert loop on fresh random inputs; experts in
    ``unused`` get no token (an empty group in the offsets)."""
    gen = torch.Generator().manual_seed(N * 7 + E)
    x = torch.randn(N, D, generator=gen).to(device, dtype)
    w1 = [(torch.randn(I, D, generator=gen) / D ** 0.5).to(device, dtype) for _ in range(E)]
    w3 = [(torch.randn(I, D, generator=gen) / D ** 0.5).to(device, dtype) for _ in range(E)]
    w2 = [(torch.randn(D, I, generator=gen) / I ** 0.5).to(device, dtype) for _ in range(E)]
    allowed = torch.tensor([e for e in range(E) if e not in unused])
    idx = torch.stack([allowed[torch.randperm(len(allowed), generator=gen)[:k]] for _ in range(N)]).to(device)
    wts = torch.rand(N, k, generator=gen).to(device)
    got = grouped_swiglu(x, idx, wts, w1, w3, w2, grouped_mm=True)
    want = grouped_swiglu(x, idx, wts, w1, w3, w2, grouped_mm=False)
    assert got.dtype == dtype and got.shape == (N, D)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got.float(), want.float(), **tol)
    return got


def test_grouped_mm_experts_equal_the_loop():
    check_grouped_mm_path("cpu", torch.float32, E=5, D=16, I=24, N=30, k=2, unused=(3,))
    check_grouped_mm_path("cpu", torch.bfloat16, E=4, D=32, I=16, N=9, k=3)


def test_grouped_swiglu_no_tokens():
    w = [torch.randn(8, 16) for _ in range(3)]
    out = grouped_swiglu(torch.zeros(0, 16), torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2), w, w,
                         [torch.randn(16, 8) for _ in range(3)])
    assert out.shape == (0, 16)


@pytest.mark.gpu
def test_grouped_mm_experts_gpu(cuda_device):
    # the decode benchmark's expert shape, a prefill's worth of slots, two experts with no token
    got = check_grouped_mm_path(cuda_device, torch.bfloat16, E=16, D=2304, I=1024, N=2048, k=8, unused=(5, 11))
    assert torch.isfinite(got).all()
    # inference in bf16 on CUDA takes the grouped path by default
    from kimi_linear.ops import moe
    assert moe._grouped_mm_usable(got, [torch.empty(1024, 2304, device=cuda_device, dtype=torch.bfloat16)] * 2,
                                  [torch.empty(1024, 2304, device=cuda_device, dtype=torch.bfloat16)] * 2,
                                  [torch.empty(2304, 1024, device=cuda_device, dtype=torch.bfloat16)] * 2,
                                  2048 * 8, None)


def test_expert_load_counts_and_mask():
    idx = torch.tensor([[0, 1], [1, 2], [1, 3]])
    assert torch.equal(expert_load(idx, 5), torch.tensor([1.0, 3.0, 1.0, 1.0, 0.0]))
    mask = torch.tensor([True, False, True])
    assert torch.equal(expert_load(idx, 5, mask), torch.tensor([1.0, 2.0, 0.0, 1.0, 0.0]))


def test_route_bad_input():
    with pytest.raises(ValueError, match="top_k"):
        route(torch.randn(2, 4), None, 5)
    with pytest.raises(ValueError, match="num_groups"):
        route(torch.randn(2, 6), None, 2, num_groups=4)


def test_grouped_swiglu_empty_expert_gets_zero_grads_not_none():
    # FSDP2 reduce-scatters the same parameter set on every rank: an expert no token chose on this
    # rank must still receive a (zero) gradient, or ranks disagree on what they reduce
    torch.manual_seed(0)
    E, D, F_ = 4, 8, 16
    w1 = [torch.randn(F_, D, requires_grad=True) for _ in range(E)]
    w3 = [torch.randn(F_, D, requires_grad=True) for _ in range(E)]
    w2 = [torch.randn(D, F_, requires_grad=True) for _ in range(E)]
    x = torch.randn(5, D)
    indices = torch.tensor([[0, 1]] * 5)  # experts 2 and 3 get no token
    weights = torch.rand(5, 2)
    grouped_swiglu(x, indices, weights, w1, w3, w2).sum().backward()
    for e in (2, 3):
        for w in (w1[e], w3[e], w2[e]):
            assert w.grad is not None and torch.count_nonzero(w.grad) == 0
    assert torch.count_nonzero(w1[0].grad) > 0


def check_route_kernel(device, N, E, k, bias, renorm, scaling):
    """The one-launch Triton router against the PyTorch route (no grad): same experts, same weights."""
    logits = torch.randn(N, E, device=device) * 2
    b = torch.randn(E, device=device) * 0.5 if bias else None
    with torch.no_grad():
        w, i = route(logits, b, k, renormalize=renorm, scaling=scaling, backend="triton")
        w_ref, i_ref = route(logits, b, k, renormalize=renorm, scaling=scaling, backend="reference")
    assert w.dtype == torch.float32 and i.dtype == torch.int64 and w.shape == i.shape == (N, k)
    i_sorted, order = i.sort(dim=-1)
    i_ref_sorted, order_ref = i_ref.sort(dim=-1)
    assert torch.equal(i_sorted, i_ref_sorted)
    torch.testing.assert_close(w.gather(1, order), w_ref.gather(1, order_ref), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("N,E,k,bias,renorm,scaling", [(5, 16, 8, True, True, 2.446), (3, 6, 1, False, True, 1.0),
                                                       (2, 6, 6, True, False, 1.5), (1, 256, 8, True, True, 2.5)])
def test_route_kernel_interpreter(N, E, k, bias, renorm, scaling):
    pytest.importorskip("triton")
    if not __import__("kimi_linear.backends").backends.triton_interpret():
        pytest.skip("needs TRITON_INTERPRET=1")
    check_route_kernel("cpu", N, E, k, bias, renorm, scaling)


def test_route_kernel_not_used_with_grad_or_groups():
    pytest.importorskip("triton")
    if not __import__("kimi_linear.backends").backends.triton_interpret():
        pytest.skip("forces backend='triton' on CPU tensors: needs TRITON_INTERPRET=1")
    logits = torch.randn(4, 8, requires_grad=True)
    w, _ = route(logits, None, 2, backend="triton")  # a gradient to carry: the PyTorch path
    w.sum().backward()
    assert logits.grad is not None
    with torch.no_grad():  # expert groups: the PyTorch path, same answer as the reference
        got = route(logits, None, 2, num_groups=4, topk_groups=2, backend="triton")
        want = route(logits, None, 2, num_groups=4, topk_groups=2, backend="reference")
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])


def check_route_tokens(device, N, D, E, k, dtype, scratch=None):
    """The router with its logits computed in the routing kernel (split over programs with a
    ``scratch``) == F.linear in fp32, then route."""
    x = torch.randn(N, D, device=device).to(dtype)
    w_gate = (torch.randn(E, D, device=device) * D**-0.5).to(dtype)
    b = torch.randn(E, device=device) * 0.1
    with torch.no_grad():
        w, i = route_tokens(x, w_gate, b, k, scaling=2.5, backend="triton", scratch=scratch)
        w_ref, i_ref = route(F.linear(x.float(), w_gate.float()), b, k, scaling=2.5, backend="reference")
    i_sorted, order = i.sort(dim=-1)
    i_ref_sorted, order_ref = i_ref.sort(dim=-1)
    assert torch.equal(i_sorted, i_ref_sorted)
    torch.testing.assert_close(w.gather(1, order), w_ref.gather(1, order_ref), rtol=1e-5, atol=1e-6)


def test_route_tokens_kernel_interpreter():
    pytest.importorskip("triton")
    if not __import__("kimi_linear.backends").backends.triton_interpret():
        pytest.skip("needs TRITON_INTERPRET=1")
    check_route_tokens("cpu", 3, 200, 16, 4, torch.float32)  # D not a multiple of the kernel's 128
    check_route_tokens("cpu", 1, 64, 6, 6, torch.float32)
    check_route_tokens("cpu", 2, 2304, 32, 8, torch.float32)  # the most experts in-kernel, split 9 ways
    # a prefill's many tokens: logits from one GEMM, then the routing kernel (bit for bit that path)
    from kimi_linear.ops.moe import ROUTE_IN_KERNEL_MAX_TOKENS

    x, w_gate = torch.randn(ROUTE_IN_KERNEL_MAX_TOKENS + 1, 32), torch.randn(6, 32)
    with torch.no_grad():
        got = route_tokens(x, w_gate, None, 2, backend="triton")
        want = route(F.linear(x, w_gate), None, 2, backend="triton")
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_route_tokens_split_router_interpreter(monkeypatch):
    # the router split over programs per token (the last to finish routes): both forms, odd D, several
    # tokens; the per-token counters are back at zero after every call and repeated calls agree bit for bit
    pytest.importorskip("triton")
    if not __import__("kimi_linear.backends").backends.triton_interpret():
        pytest.skip("needs TRITON_INTERPRET=1")
    from kimi_linear.ops import moe_route_kernel as rk

    assert rk.split_plan(16, 2304) == (256, 9) and rk.split_plan(16, 200)[1] == 1
    scratch = rk.RouterScratch()
    for split_d in (256, 0):
        monkeypatch.setattr(rk, "SPLIT_D", split_d)
        check_route_tokens("cpu", 3, 2304 - 37, 16, 8, torch.float32, scratch)
        check_route_tokens("cpu", 2, 1000, 6, 2, torch.float32, scratch)
    assert scratch.counter is not None and int(scratch.counter.abs().sum()) == 0
    monkeypatch.setattr(rk, "SPLIT_D", 64)  # 16 slices of 64 on D = 1000
    assert rk.split_plan(16, 1000) == (64, 16)
    x, w_gate = torch.randn(4, 1000), torch.randn(16, 1000) * 0.03
    with torch.no_grad():
        first = route_tokens(x, w_gate, None, 4, backend="triton", scratch=scratch)
        again = route_tokens(x, w_gate, None, 4, backend="triton", scratch=scratch)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert int(scratch.counter.abs().sum()) == 0
    # one workspace for every call the in-kernel router takes, never replaced (a captured graph keeps
    # pointing at it); a larger direct call takes the one-program kernel
    from kimi_linear.ops.moe import ROUTE_IN_KERNEL_MAX_EXPERTS, ROUTE_IN_KERNEL_MAX_TOKENS

    assert rk.SCRATCH_TOKENS >= ROUTE_IN_KERNEL_MAX_TOKENS and rk.SCRATCH_EXPERTS >= ROUTE_IN_KERNEL_MAX_EXPERTS
    ptr = scratch.partial.data_ptr()
    assert scratch.get(torch.device("cpu"), rk.SCRATCH_TOKENS, rk.SPLIT_MAX, rk.SCRATCH_EXPERTS)[0].data_ptr() == ptr
    assert scratch.get(torch.device("cpu"), rk.SCRATCH_TOKENS + 1, 2, 16) is None
    with pytest.raises(TypeError, match="RouterScratch"):
        route_tokens(x, w_gate, None, 4, backend="triton", scratch=torch.zeros(4))


def check_route_tokens_norm(device, N, D, E, k, dtype, scratch=None):
    """The router given the un-normalised x and an RMSNorm weight (folded into the split router's
    programs with a ``scratch``, applied first otherwise) == routing ``rms_norm(x)`` (in fp32)."""
    from kimi_linear.ops.norm import rms_norm

    x = (torch.randn(N, D, device=device) * 6.0).to(dtype)
    nw = (torch.rand(D, device=device) + 0.5).to(dtype)
    w_gate = (torch.randn(E, D, device=device) * D**-0.5).to(dtype)
    b = torch.randn(E, device=device) * 0.1
    with torch.no_grad():
        w, i = route_tokens(x, w_gate, b, k, scaling=2.5, backend="triton", scratch=scratch, norm_weight=nw, eps=1e-5)
        normed = rms_norm(x.float(), nw.float(), 1e-5)
        w_ref, i_ref = route(F.linear(normed, w_gate.float()), b, k, scaling=2.5, backend="reference")
    i_sorted, order = i.sort(dim=-1)
    i_ref_sorted, order_ref = i_ref.sort(dim=-1)
    assert torch.equal(i_sorted, i_ref_sorted)
    torch.testing.assert_close(w.gather(1, order), w_ref.gather(1, order_ref), rtol=1e-5, atol=1e-6)


def test_route_tokens_folded_norm_interpreter(monkeypatch):
    # the decode step's post-attention norm folded into the split router (each program's slice sum of
    # squares, the last scales the logits by rstd), and the one-program / GEMM paths that normalise first
    pytest.importorskip("triton")
    if not __import__("kimi_linear.backends").backends.triton_interpret():
        pytest.skip("needs TRITON_INTERPRET=1")
    from kimi_linear.ops import moe_route_kernel as rk

    scratch = rk.RouterScratch()
    check_route_tokens_norm("cpu", 3, 2304 - 37, 16, 8, torch.float32, scratch)  # 9 slices, the last one short
    check_route_tokens_norm("cpu", 1, 1000, 6, 2, torch.float32, scratch)
    assert int(scratch.counter.abs().sum()) == 0
    check_route_tokens_norm("cpu", 2, 200, 16, 4, torch.float32)  # no scratch: the one-program kernel
    monkeypatch.setattr(rk, "SPLIT_D", 0)
    check_route_tokens_norm("cpu", 2, 1000, 16, 4, torch.float32, scratch)  # the split router off
    x, w_gate = torch.randn(2, 8), torch.randn(5, 8)
    with pytest.raises(ValueError, match=r"norm_weight must be \[D=8\]"):
        route_tokens(x, w_gate, None, 2, norm_weight=torch.ones(7))
    with pytest.raises(ValueError, match="norm_weight needs the hidden states"):
        rk.route_triton(torch.randn(2, 5), None, 2, True, 1.0, norm_weight=torch.ones(8))


def test_route_tokens_folded_norm_reference():
    from kimi_linear.ops.norm import rms_norm

    x, w_gate, nw = torch.randn(4, 8) * 3, torch.randn(5, 8), torch.rand(8) + 0.5
    got = route_tokens(x, w_gate, None, 2, norm_weight=nw, eps=1e-5)
    want = route(F.linear(rms_norm(x, nw, 1e-5), w_gate), None, 2)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_route_tokens_many_experts_use_the_gemm(monkeypatch):
    # above ROUTE_IN_KERNEL_MAX_EXPERTS the logits come from one GEMM, whatever the token count
    pytest.importorskip("triton")
    if not __import__("kimi_linear.backends").backends.triton_interpret():
        pytest.skip("needs TRITON_INTERPRET=1")
    from kimi_linear.ops import moe_route_kernel
    from kimi_linear.ops.moe import ROUTE_IN_KERNEL_MAX_EXPERTS

    seen = []
    real = moe_route_kernel.route_triton
    monkeypatch.setattr(moe_route_kernel, "route_triton",
                        lambda *a, **kw: seen.append(kw.get("hidden") is not None) or real(*a, **kw))
    with torch.no_grad():
        for E in (ROUTE_IN_KERNEL_MAX_EXPERTS, ROUTE_IN_KERNEL_MAX_EXPERTS + 1):
            x, w_gate = torch.randn(2, 32), torch.randn(E, 32)
            got = route_tokens(x, w_gate, None, 4, backend="triton")
            want = route(F.linear(x, w_gate), None, 4, backend="reference")
            assert torch.equal(got[1].sort(-1).values, want[1].sort(-1).values)
    assert seen[0] is True and seen[-1] is False, seen


def test_router_slice_narrows_with_experts():
    pytest.importorskip("triton")
    from kimi_linear.ops.moe_route_kernel import HIDDEN_TILE_ELEMS, hidden_block_d

    assert hidden_block_d(16, 2304) == 2048 and hidden_block_d(32, 2304) == 1024 and hidden_block_d(6, 32) == 32
    for E in (1, 6, 16, 33, 64, 256, 1000):
        bd = hidden_block_d(E, 7168)
        assert bd >= 16 and (bd & (bd - 1)) == 0 and (E <= 16 or bd * (1 << (E - 1).bit_length()) <= HIDDEN_TILE_ELEMS)


def test_route_tokens_reference_and_bad_input():
    x, w_gate = torch.randn(4, 8), torch.randn(5, 8)
    got = route_tokens(x, w_gate, None, 2)
    want = route(F.linear(x, w_gate), None, 2)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    with pytest.raises(ValueError, match=r"gate_weight \[E, D\]"):
        route_tokens(x, torch.randn(5, 7), None, 2)
    # route's own checks, before any path is chosen (the in-kernel path included)
    for backend in ("reference", "triton" if __import__("kimi_linear.backends").backends.triton_interpret() else "reference"):
        with pytest.raises(ValueError, match=r"top_k must be in \[1, E=5\]"):
            route_tokens(x, w_gate, None, 6, backend=backend)
        with pytest.raises(ValueError, match=r"correction_bias must be \[E=5\]"):
            route_tokens(x, w_gate, torch.zeros(4), 2, backend=backend)


@pytest.mark.gpu
def test_route_kernel_gpu(cuda_device):
    check_route_kernel(cuda_device, 64, 16, 8, True, True, 2.446)
    check_route_kernel(cuda_device, 3, 256, 8, True, True, 2.5)
    check_route_tokens(cuda_device, 1, 2304, 16, 8, torch.bfloat16)
    # in-kernel logits up to 32 experts, the weight slice narrowing with them (24: padded to 32)
    check_route_tokens(cuda_device, 2, 2304, 24, 8, torch.bfloat16)
    check_route_tokens(cuda_device, 1, 2304, 32, 8, torch.bfloat16)
    from kimi_linear.ops.moe_route_kernel import RouterScratch

    scratch = RouterScratch()  # the split router: one and the most tokens, counters back at zero
    for n, e in ((1, 16), (64, 16), (3, 32)):
        check_route_tokens(cuda_device, n, 2304 - 37, e, 8, torch.bfloat16, scratch)
        check_route_tokens_norm(cuda_device, n, 2304 - 37, e, 8, torch.bfloat16, scratch)  # the folded norm
    assert int(scratch.counter.abs().sum()) == 0
    check_route_tokens(cuda_device, 5, 2304, 256, 8, torch.bfloat16)


def test_route_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="backend"):
        route(torch.randn(3, 8, dtype=torch.float64), None, 2, backend="fast")


def test_route_bad_correction_bias():
    with pytest.raises(ValueError, match=r"correction_bias must be \[E=8\]"):
        route(torch.randn(3, 8), torch.zeros(7), 2)
    with pytest.raises(ValueError, match="correction_bias must be"):
        route(torch.randn(3, 8), torch.zeros(8, device="meta"), 2)
