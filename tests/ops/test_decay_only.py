"""The vectorised decay-only operator equals the reference (``chunk_decay_ref`` / the recurrence).

fp64 on CPU: the algorithms differ only in the order of operations, so they must agree to rounding;
gradients are compared too (the synthetic tasks train through this operator).
"""

from __future__ import annotations

import pytest
import torch

from kimi_linear.ops.kda import chunk_decay_ref, recurrent_decay_ref
from kimi_linear.ops.kda.decay_only import chunk_decay
from tests.numerics import assert_close

F64 = torch.float64


def make_inputs(B=2, T=37, H=2, HV=2, K=8, V=6, *, gate="normal", state=False, N=None, seed=0, dtype=F64):
    """Random inputs; ``gate``: "normal" (-U(0,2)), "near0" (-U(0,1e-3)), "extreme" (30% at -1e4)."""
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=dtype)
    q, k, v = r(B, T, H, K), torch.nn.functional.normalize(r(B, T, H, K), dim=-1), r(B, T, HV, V)
    u = torch.rand(B, T, HV, K, generator=gen, dtype=dtype)
    if gate == "near0":
        g = -u * 1e-3
    else:
        g = -u * 2
        if gate == "extreme":
            g = torch.where(torch.rand(B, T, HV, K, generator=gen, dtype=dtype) < 0.3, torch.full_like(g, -1e4), g)
    beta = torch.rand(B, T, HV, generator=gen, dtype=dtype)
    h0 = r(N if N is not None else B, HV, K, V) if state else None
    return q, k, v, g, beta, h0


@pytest.mark.parametrize("T", [1, 15, 16, 17, 64, 100])
@pytest.mark.parametrize("gate", ["normal", "near0", "extreme"])
@pytest.mark.parametrize("chunk_size", [1, 4, 16, 64])
def test_equals_reference(T, gate, chunk_size):
    q, k, v, g, beta, h0 = make_inputs(T=T, gate=gate, state=True, seed=T)
    o_ref, s_ref = chunk_decay_ref(q, k, v, g, beta, initial_state=h0, output_final_state=True, chunk_size=16)
    o, s = chunk_decay(q, k, v, g, beta, initial_state=h0, output_final_state=True, chunk_size=chunk_size)
    assert_close(o, o_ref, "ref", F64, "o")
    assert_close(s, s_ref, "ref", F64, "final state")


def test_equals_recurrence_grouped_heads_no_beta():
    q, k, v, g, _, h0 = make_inputs(T=50, H=2, HV=4, state=True, seed=3)
    o_ref, s_ref = recurrent_decay_ref(q, k, v, g, None, initial_state=h0, output_final_state=True)
    o, s = chunk_decay(q, k, v, g, None, initial_state=h0, output_final_state=True)
    assert_close(o, o_ref, "ref", F64, "o")
    assert_close(s, s_ref, "ref", F64, "final state")


def test_varlen_equals_reference():
    q, k, v, g, beta, h0 = make_inputs(B=1, T=60, state=True, N=4, seed=5)
    cu = torch.tensor([0, 7, 7, 40, 60])  # an empty sequence included
    o_ref, s_ref = chunk_decay_ref(q, k, v, g, beta, initial_state=h0, output_final_state=True, cu_seqlens=cu)
    o, s = chunk_decay(q, k, v, g, beta, initial_state=h0, output_final_state=True, cu_seqlens=cu)
    assert_close(o, o_ref, "ref", F64, "o")
    assert_close(s, s_ref, "ref", F64, "final state")


def test_gradients_equal_reference():
    inputs = make_inputs(T=45, state=True, seed=7)
    grads = []
    for fn in (chunk_decay_ref, chunk_decay):
        xs = [x.clone().requires_grad_(True) for x in inputs]
        q, k, v, g, beta, h0 = xs
        o, s = fn(q, k, v, g, beta, initial_state=h0, output_final_state=True)
        w = torch.randn(o.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
        ((o * w).sum() + s.square().sum()).backward()
        grads.append([x.grad for x in xs])
    for name, a, b in zip(("q", "k", "v", "g", "beta", "h0"), grads[1], grads[0]):
        assert_close(a, b, "ref", F64, f"d{name}")


def test_float32_inputs_and_output_dtypes():
    q, k, v, g, beta, _ = make_inputs(T=33, seed=9, dtype=torch.float32)
    o_ref, _ = chunk_decay_ref(q.double(), k.double(), v.double(), g.double(), beta.double())
    o, s = chunk_decay(q, k, v, g, beta, output_final_state=True)
    assert o.dtype == torch.float32 and s.dtype == torch.float32
    err = (o.double() - o_ref).norm() / o_ref.norm()
    assert err < 1e-5, err  # true fp32 arithmetic on CPU


def test_rejects_bad_inputs():
    q, k, v, g, beta, _ = make_inputs(T=8)
    with pytest.raises(ValueError, match="log-decay"):
        chunk_decay(q, k, v, -g, beta)
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_decay(q, k, v, g, beta, chunk_size=0)


@pytest.mark.gpu
def test_cuda_fp32_matches_fp64_reference(cuda_device):
    """On a GPU at a synthetic-task shape (fp32 arithmetic, no TF32 by default): outputs and grads."""
    inputs = make_inputs(B=4, T=300, H=2, K=128, V=128, state=True, seed=11)
    ref_in = [x.clone().requires_grad_(True) for x in inputs]
    gpu_in = [x.float().to(cuda_device).requires_grad_(True) for x in inputs]
    outs = []
    for fn, xs in ((chunk_decay_ref, ref_in), (chunk_decay, gpu_in)):
        q, k, v, g, beta, h0 = xs
        o, s = fn(q, k, v, g, beta, initial_state=h0, output_final_state=True)
        (o.double().cpu().sin().sum() + s.double().cpu().square().sum()).backward()
        outs.append((o, s, [x.grad for x in xs]))
    (o_r, s_r, g_r), (o, s, gr) = outs
    assert_close(o, o_r, "kernel_fwd", torch.float32, "o")
    assert_close(s, s_r, "kernel_fwd", torch.float32, "final state")
    for name, a, b in zip(("q", "k", "v", "g", "beta", "h0"), gr, g_r):
        assert_close(a, b, "kernel_bwd", torch.float32, f"d{name}")
