"""The KDA references agree with each other and with the recurrence's defining properties.

Everything here is float64 on CPU: the two algorithms must agree to rounding (~1e-10 relative).
"""

from __future__ import annotations

import pytest
import torch

from kimi_linear.ops.kda import (
    KDAFusion,
    chunk_decay_ref,
    chunk_gdn_ref,
    chunk_kda_ref,
    kda_gate_ref,
    l2norm,
    recurrent_decay_ref,
    recurrent_gdn_ref,
    recurrent_kda_ref,
)
from tests.numerics import assert_close, rel_rms, tolerance

F64 = torch.float64


def make_inputs(B=1, T=20, H=2, HV=2, K=12, V=10, *, gate="normal", dtype=F64, state=False, N=None, seed=None):
    """Fresh random KDA inputs. ``gate``: "normal" (-U(0,2)), "near0" (-U(0,1e-3)), "extreme" (some -1e4)."""
    gen = torch.Generator().manual_seed(seed if seed is not None else torch.randint(0, 2**31, ()).item())
    r = lambda *s: torch.randn(*s, generator=gen, dtype=dtype)
    q, k = r(B, T, H, K), l2norm(r(B, T, H, K))
    v = r(B, T, HV, V)
    if gate == "near0":
        g = -torch.rand(B, T, HV, K, generator=gen, dtype=dtype) * 1e-3
    else:
        g = -torch.rand(B, T, HV, K, generator=gen, dtype=dtype) * 2
        if gate == "extreme":
            g = torch.where(torch.rand(B, T, HV, K, generator=gen, dtype=dtype) < 0.3, torch.full_like(g, -1e4), g)
    beta = torch.rand(B, T, HV, generator=gen, dtype=dtype)
    h0 = r(N if N is not None else B, HV, K, V) if state else None
    return q, k, v, g, beta, h0


def both(q, k, v, g, beta, h0=None, cu=None, chunk_size=64):
    o_r, s_r = recurrent_kda_ref(q, k, v, g, beta, initial_state=h0, output_final_state=True, cu_seqlens=cu)
    o_c, s_c = chunk_kda_ref(q, k, v, g, beta, initial_state=h0, output_final_state=True, cu_seqlens=cu,
                             chunk_size=chunk_size)
    return (o_r, s_r), (o_c, s_c)


@pytest.mark.parametrize("T", [1, 7, 63, 64, 65, 200])
@pytest.mark.parametrize("gate", ["normal", "near0", "extreme"])
@pytest.mark.parametrize("gva,state", [(False, False), (True, True)])
def test_chunk_equals_recurrent(T, gate, gva, state):
    H = 2
    q, k, v, g, beta, h0 = make_inputs(B=2, T=T, H=H, HV=2 * H if gva else H, K=12, V=10, gate=gate, state=state)
    (o_r, s_r), (o_c, s_c) = both(q, k, v, g, beta, h0)
    assert_close(o_c, o_r, "ref", F64, "o")
    assert_close(s_c, s_r, "ref", F64, "final state")
    assert torch.isfinite(o_c).all() and torch.isfinite(s_c).all()


def test_chunk_sizes_agree():
    q, k, v, g, beta, h0 = make_inputs(T=100, state=True)
    ref = chunk_kda_ref(q, k, v, g, beta, initial_state=h0, output_final_state=True, chunk_size=64)
    for C in (1, 16, 37, 128):
        out = chunk_kda_ref(q, k, v, g, beta, initial_state=h0, output_final_state=True, chunk_size=C)
        assert_close(out[0], ref[0], "ref", F64, f"o, chunk {C}")
        assert_close(out[1], ref[1], "ref", F64, f"state, chunk {C}")


def test_varlen_pack_equals_separate_calls():
    lens = [5, 0, 1, 70, 64, 0, 130]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    T = sum(lens)
    q, k, v, g, beta, h0 = make_inputs(B=1, T=T, H=2, HV=4, gate="extreme", state=True, N=len(lens))
    for fn in (recurrent_kda_ref, chunk_kda_ref):
        o, s = fn(q, k, v, g, beta, initial_state=h0, output_final_state=True, cu_seqlens=cu)
        for n in range(len(lens)):
            a, b = cu[n].item(), cu[n + 1].item()
            o_n, s_n = recurrent_kda_ref(q[:, a:b], k[:, a:b], v[:, a:b], g[:, a:b], beta[:, a:b],
                                         initial_state=h0[n : n + 1], output_final_state=True)
            if b > a:
                assert_close(o[:, a:b], o_n, "ref", F64, f"{fn.__name__} seq {n}")
            assert_close(s[n], s_n[0], "ref", F64, f"{fn.__name__} state {n}")
        # an empty sequence hands its initial state straight through
        assert torch.equal(s[1], h0[1]) and torch.equal(s[5], h0[5])


@pytest.mark.parametrize("fn", [recurrent_kda_ref, chunk_kda_ref])
def test_split_in_two_calls_equals_one(fn):
    q, k, v, g, beta, h0 = make_inputs(B=2, T=150, state=True)
    o, s = fn(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    cut = 77
    o1, s1 = fn(q[:, :cut], k[:, :cut], v[:, :cut], g[:, :cut], beta[:, :cut], initial_state=h0, output_final_state=True)
    o2, s2 = fn(q[:, cut:], k[:, cut:], v[:, cut:], g[:, cut:], beta[:, cut:], initial_state=s1, output_final_state=True)
    assert_close(torch.cat([o1, o2], 1), o, "ref", F64, "o")
    assert_close(s2, s, "ref", F64, "state")


@pytest.mark.parametrize("fn", [recurrent_kda_ref, chunk_kda_ref])
def test_causality_bit_exact(fn):
    q, k, v, g, beta, _ = make_inputs(T=130)
    o = fn(q, k, v, g, beta)[0]
    t = 70
    q2, k2, v2, g2, b2 = (x.clone() for x in (q, k, v, g, beta))
    for x in (q2, k2, v2):
        x[:, t + 1 :] = torch.randn_like(x[:, t + 1 :])
    g2[:, t + 1 :] = -torch.rand_like(g2[:, t + 1 :]) * 5
    b2[:, t + 1 :] = torch.rand_like(b2[:, t + 1 :])
    o2 = fn(q2, k2, v2, g2, b2)[0]
    assert torch.equal(o[:, : t + 1], o2[:, : t + 1]), "output before t changed when only later inputs changed"
    assert not torch.equal(o[:, t + 1 :], o2[:, t + 1 :])


@pytest.mark.parametrize("fn", [recurrent_kda_ref, chunk_kda_ref])
def test_gradcheck(fn):
    q, k, v, g, beta, h0 = make_inputs(B=1, T=9, H=1, HV=2, K=4, V=3, state=True)
    inputs = [x.requires_grad_() for x in (q, k, v, g, beta, h0)]

    def f(q, k, v, g, beta, h0):
        extra = {"chunk_size": 4} if fn is chunk_kda_ref else {}
        o, s = fn(q, k, v, g, beta, initial_state=h0, output_final_state=True, **extra)
        return o, s

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7)


def test_gradients_agree_between_algorithms():
    q, k, v, g, beta, h0 = make_inputs(T=100, HV=4, state=True, gate="extreme")
    grads = []
    for fn in (recurrent_kda_ref, chunk_kda_ref):
        xs = [x.clone().requires_grad_() for x in (q, k, v, g, beta, h0)]
        o, s = fn(*xs[:5], initial_state=xs[5], output_final_state=True)
        gen = torch.Generator().manual_seed(1)
        (o * torch.randn(o.shape, generator=gen, dtype=F64)).sum().backward(retain_graph=True)
        (s * torch.randn(s.shape, generator=gen, dtype=F64)).sum().backward()
        grads.append([x.grad for x in xs])
        assert all(torch.isfinite(gr).all() for gr in grads[-1])
    for name, a, b in zip("q k v g beta h0".split(), grads[0], grads[1]):
        assert rel_rms(b, a) <= 1e-9, f"d{name}: {rel_rms(b, a):.2e}"


def test_constant_gate_equals_gated_deltanet():
    q, k, v, g, beta, h0 = make_inputs(T=90, HV=4, state=True)
    g_head = g[..., 0]  # one decay per head
    g_kda = g_head.unsqueeze(-1).expand_as(g).contiguous()
    ref = recurrent_kda_ref(q, k, v, g_kda, beta, initial_state=h0, output_final_state=True)
    for fn in (recurrent_gdn_ref, chunk_gdn_ref):
        out = fn(q, k, v, g_head, beta, initial_state=h0, output_final_state=True)
        assert_close(out[0], ref[0], "ref", F64, fn.__name__)
        assert_close(out[1], ref[1], "ref", F64, fn.__name__)


def test_beta_zero_only_decays():
    q, k, v, g, beta, h0 = make_inputs(T=70, state=True)
    o, s = chunk_kda_ref(q, k, v, g, torch.zeros_like(beta), initial_state=h0, output_final_state=True)
    expected = h0 * torch.exp(g.sum(1))[0].unsqueeze(-1)
    assert_close(s, expected, "ref", F64, "state under beta=0")
    # and o_t = scale * (Diag(exp(G_t)) S_0)^T q_t
    G = g.cumsum(1)[0]  # [T, HV, K]
    o_exp = torch.einsum("thk,hkv->thv", q[0] * torch.exp(G), h0[0]) * 12**-0.5
    assert_close(o[0], o_exp, "ref", F64, "o under beta=0")


def test_decay_only_family():
    q, k, v, g, beta, h0 = make_inputs(T=100, HV=4, state=True)
    r = recurrent_decay_ref(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    c = chunk_decay_ref(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    assert_close(c[0], r[0], "ref", F64, "o")
    assert_close(c[1], r[1], "ref", F64, "state")
    # by hand for the first two tokens, heads HV=4 share q/k head hv // 2
    kk = k.repeat_interleave(2, dim=2)
    S1 = h0[0] * torch.exp(g[0, 0]).unsqueeze(-1) + beta[0, 0, :, None, None] * kk[0, 0, :, :, None] * v[0, 0, :, None, :]
    qq = q.repeat_interleave(2, dim=2)
    assert_close(r[0][0, 0], torch.einsum("hk,hkv->hv", qq[0, 0], S1) * 12**-0.5, "ref", F64, "token 0")
    # the delta rule makes a difference
    kda = recurrent_kda_ref(q, k, v, g, beta, initial_state=h0)[0]
    assert rel_rms(kda, r[0]) > 1e-3


def test_recurrence_by_hand_one_token():
    q, k, v, g, beta, h0 = make_inputs(T=1, H=1, HV=1, K=3, V=2, state=True)
    S0 = h0[0, 0]
    a = torch.diag(torch.exp(g[0, 0, 0]))
    kv = k[0, 0, 0]
    S1 = (torch.eye(3, dtype=F64) - beta[0, 0, 0] * torch.outer(kv, kv)) @ a @ S0 + beta[0, 0, 0] * torch.outer(kv, v[0, 0, 0])
    for fn in (recurrent_kda_ref, chunk_kda_ref):
        o, s = fn(q, k, v, g, beta, initial_state=h0, output_final_state=True, scale=0.5)
        assert_close(s[0, 0], S1, "ref", F64, fn.__name__)
        assert_close(o[0, 0, 0], 0.5 * S1.T @ q[0, 0, 0], "ref", F64, fn.__name__)


def test_dtypes_and_empty_time():
    q, k, v, g, beta, _ = make_inputs(T=0, dtype=torch.float32)
    o, s = chunk_kda_ref(q, k, v, g, beta, output_final_state=True)
    assert o.shape == v.shape and s.shape == (1, 2, 12, 10) and s.dtype == torch.float32 and (s == 0).all()
    q, k, v, g, beta, _ = make_inputs(T=33, dtype=torch.float32)
    o, s = chunk_kda_ref(q.bfloat16(), k.bfloat16(), v.bfloat16(), g, beta, output_final_state=True)
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    o64 = recurrent_kda_ref(*(x.double() for x in (q, k, v, g, beta)))[0]
    assert rel_rms(o, o64) < 2e-2


def test_fusion_matches_explicit_preprocessing():
    B, T, H, K, V = 1, 40, 2, 8, 6
    gen = torch.Generator().manual_seed(3)
    q, k = torch.randn(B, T, H, K, generator=gen, dtype=F64), torch.randn(B, T, H, K, generator=gen, dtype=F64)
    v = torch.randn(B, T, H, V, generator=gen, dtype=F64)
    g_raw = torch.randn(B, T, H, K, generator=gen, dtype=F64) * 3
    b_logit = torch.randn(B, T, H, generator=gen, dtype=F64)
    A_log = torch.randn(1, 1, H, 1, generator=gen, dtype=F64)
    dt_bias = torch.randn(H * K, generator=gen, dtype=F64)
    fused = chunk_kda_ref(q, k, v, g_raw, b_logit, fusion=KDAFusion(True, True, A_log, dt_bias))[0]
    g = kda_gate_ref(g_raw, A_log, dt_bias)
    explicit = recurrent_kda_ref(l2norm(q), l2norm(k), v, g, torch.sigmoid(b_logit))[0]
    assert_close(fused, explicit, "ref", F64, "fused")


def test_gate_and_l2norm():
    x = torch.randn(2, 3, 4, 5, dtype=F64)
    A_log, dt_bias = torch.randn(4, dtype=F64), torch.randn(20, dtype=F64)
    g = kda_gate_ref(x, A_log, dt_bias)
    manual = -torch.exp(A_log)[:, None] * torch.log1p(torch.exp(x + dt_bias.view(4, 5)))
    assert torch.allclose(g, manual, rtol=1e-12, atol=1e-12)
    g_flat = kda_gate_ref(x.flatten(-2), A_log.view(1, 1, 4, 1), dt_bias, num_heads=4)
    assert torch.equal(g_flat, g)
    big = kda_gate_ref(torch.full((1, 4, 5), 1e30, dtype=torch.float32), A_log.float(), dt_bias.float())
    assert torch.isfinite(big).all() and (big < -1e29).all()
    assert (kda_gate_ref(torch.full((4, 5), -1e4), A_log.float(), dt_bias.float()) <= 0).all()
    n = l2norm(x)
    assert torch.allclose(n.norm(dim=-1), torch.ones(2, 3, 4, dtype=F64), atol=1e-6)
    assert torch.equal(l2norm(torch.zeros(3, 4)), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="A_log"):
        kda_gate_ref(x, torch.randn(3), dt_bias)
    with pytest.raises(ValueError, match="dt_bias"):
        kda_gate_ref(x, A_log, torch.randn(7))


def test_extreme_gates_stay_finite_in_fp32():
    q, k, v, g, beta, h0 = make_inputs(T=130, gate="extreme", dtype=torch.float32, state=True)
    g = torch.where(torch.rand_like(g) < 0.5, torch.full_like(g, -1e30), g)
    beta[:, :10] = 1.0
    beta[:, 10:20] = 0.0
    o, s = chunk_kda_ref(q, k, v, g, beta, initial_state=h0.float(), output_final_state=True)
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    o_r, s_r = recurrent_kda_ref(q, k, v, g, beta, initial_state=h0.float(), output_final_state=True)
    assert rel_rms(o, o_r) < 1e-5


# ---------------------------------------------------------------------------------------------- bad input


def _bad(**over):
    q, k, v, g, beta, _ = make_inputs(B=1, T=5, H=2, HV=4, K=4, V=3, dtype=torch.float32)
    args = dict(q=q, k=k, v=v, g=g, beta=beta)
    kw = over.pop("kw", {})
    args.update(over)
    return args, kw


@pytest.mark.parametrize("fn", [recurrent_kda_ref, chunk_kda_ref])
@pytest.mark.parametrize(
    "case,err,match",
    [
        ("k_shape", ValueError, r"k must have q's shape"),
        ("hv_not_multiple", ValueError, r"HV=3 must be a positive multiple of q/k heads H=2"),
        ("g_shape", ValueError, r"g must be \[B, T, HV, K\]"),
        ("beta_shape", ValueError, r"beta must be \[B, T, HV\]"),
        ("state_shape", ValueError, r"initial_state must be \[N, HV, K, V\]"),
        ("state_dtype", TypeError, r"initial_state must be float32"),
        ("positive_gate", ValueError, r"must be <= 0 everywhere"),
        ("nan_gate", ValueError, r"NaN"),
        ("int_q", TypeError, r"q must be a floating tensor"),
        ("cu_decreasing", ValueError, r"non-decreasing"),
        ("cu_batch", ValueError, r"batch must be 1"),
        ("cu_end", ValueError, r"end at T=5"),
        ("cu_dtype", TypeError, r"int32 or int64"),
        ("q_3d", ValueError, r"q must be \[B, T, H, K\]"),
    ],
)
def test_bad_input_is_named(fn, case, err, match):
    args, kw = _bad()
    q, g = args["q"], args["g"]
    if case == "k_shape":
        args["k"] = torch.randn(1, 5, 2, 5)
    elif case == "hv_not_multiple":
        args["v"], args["g"], args["beta"] = torch.randn(1, 5, 3, 3), torch.zeros(1, 5, 3, 4), torch.rand(1, 5, 3)
    elif case == "g_shape":
        args["g"] = g[..., :2]
    elif case == "beta_shape":
        args["beta"] = torch.rand(1, 5, 2)
    elif case == "state_shape":
        kw["initial_state"] = torch.zeros(1, 4, 3, 4)
    elif case == "state_dtype":
        kw["initial_state"] = torch.zeros(1, 4, 4, 3, dtype=torch.bfloat16)
    elif case == "positive_gate":
        args["g"] = g.abs() + 0.1
    elif case == "nan_gate":
        g = g.clone()
        g[0, 1, 0, 0] = float("nan")
        args["g"] = g
    elif case == "int_q":
        args["q"] = q.to(torch.int32)
    elif case == "cu_decreasing":
        kw["cu_seqlens"] = torch.tensor([0, 3, 2, 5])
    elif case == "cu_batch":
        args = {n: torch.cat([t, t]) for n, t in args.items()}
        kw["cu_seqlens"] = torch.tensor([0, 5])
    elif case == "cu_end":
        kw["cu_seqlens"] = torch.tensor([0, 3, 4])
    elif case == "cu_dtype":
        kw["cu_seqlens"] = torch.tensor([0.0, 5.0])
    elif case == "q_3d":
        args["q"] = q[0]
    with pytest.raises(err, match=match):
        fn(args["q"], args["k"], args["v"], args["g"], args["beta"], **kw)


def test_tolerance_table_is_not_empty_for_refs():
    assert tolerance("ref", F64) <= 1e-10


# ---------------------------------------------------------------------------------------------- property test

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=25, deadline=None)
@given(
    T=st.integers(0, 90),
    H=st.integers(1, 2),
    group=st.integers(1, 3),
    K=st.integers(1, 9),
    V=st.integers(1, 9),
    chunk=st.sampled_from([1, 8, 16, 64]),
    log_gate_scale=st.floats(-4, 4),
    seed=st.integers(0, 2**16),
)
def test_chunk_equals_recurrent_property(T, H, group, K, V, chunk, log_gate_scale, seed):
    q, k, v, g, beta, h0 = make_inputs(B=1, T=T, H=H, HV=H * group, K=K, V=V, state=True, seed=seed)
    g = g * 10**log_gate_scale
    (o_r, s_r), (o_c, s_c) = both(q, k, v, g, beta, h0, chunk_size=chunk)
    assert_close(o_c, o_r, "ref", F64, "o")
    assert_close(s_c, s_r, "ref", F64, "state")
