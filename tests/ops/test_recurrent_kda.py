"""recurrent_kda (Triton decode kernel) against the reference, incl. the in-place state pool.

CPU: the kernel runs under TRITON_INTERPRET=1 (tests/ops/conftest.py) at tiny sizes.
GPU (``-m gpu``): full decode sizes (32 heads of 128x128 fp32 state), bf16/fp16/fp32.
Every comparison is against the fp64 reference on the same (fp32-made, then cast) inputs.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kimi_linear.backends import triton_usable_on, triton_version
from kimi_linear.ops.kda import KDAFusion, recurrent_kda_ref
from kimi_linear.ops.kda.recurrent import recurrent_kda
from tests.numerics import assert_close, rel_rms

needs_triton = pytest.mark.skipif(triton_version() is None, reason="needs Triton")


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# fp32 tolerance: the GPU's tf32 allowance, or the tighter one of Triton's CPU interpreter (true fp32 dots)
FWD32 = "kernel_fwd" if torch.cuda.is_available() else "kernel_interp"


def make_inputs(B, T, H, HV, K, V, *, device, fused=False, gate_scale=1.0, seed=0):
    """fp32 inputs; raw forms when ``fused`` (q/k unnormalised, raw gate, beta logits)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)
    q, k, v = r(B, T, H, K), r(B, T, H, K), r(B, T, HV, V)
    if fused:
        g, beta = r(B, T, HV, K) * 2 * gate_scale, r(B, T, HV)
        fusion = KDAFusion(qk_l2norm=True, beta_sigmoid=True, A_log=(r(HV) * 0.5).to(device),
                           dt_bias=(r(HV * K) * 0.5).to(device))
    else:
        k = F.normalize(k, dim=-1)
        g = -torch.rand(B, T, HV, K, generator=gen) * gate_scale
        beta = torch.rand(B, T, HV, generator=gen)
        fusion = None
    return [x.to(device) for x in (q, k, v, g, beta)], fusion


def ref64(q, k, v, g, beta, fusion, **kw):
    f64 = None
    if fusion is not None:
        f64 = KDAFusion(qk_l2norm=fusion.qk_l2norm, beta_sigmoid=fusion.beta_sigmoid,
                        A_log=fusion.A_log.double(), dt_bias=fusion.dt_bias.double())
    init = kw.pop("initial_state", None)
    return recurrent_kda_ref(q.double(), k.double(), v.double(), g.double(), beta.double(), fusion=f64,
                             initial_state=None if init is None else init.double(), **kw)


def _cast(xs, dtype):
    q, k, v, g, beta = xs
    return q.to(dtype), k.to(dtype), v.to(dtype), g, beta.to(dtype)


# ------------------------------------------------------------------------------------------------
# CPU interpreter (also runs on GPU machines: then it is the compiled kernel)
# ------------------------------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("B,T,H,HV", [(2, 1, 2, 2), (2, 5, 1, 2), (1, 3, 2, 4)])
@pytest.mark.parametrize("with_init", [False, True])
def test_kernel_matches_reference(B, T, H, HV, with_init, poisoned_alloc):
    dev = _device()
    K, V = 16, 32
    xs, _ = make_inputs(B, T, H, HV, K, V, device=dev)
    h0 = torch.randn(B, HV, K, V, device=dev) if with_init else None
    o, ht = recurrent_kda(*xs, initial_state=h0, output_final_state=True, backend="triton")
    o_ref, ht_ref = ref64(*xs, None, initial_state=h0, output_final_state=True)
    assert_close(o, o_ref, FWD32, torch.float32, "o")
    assert_close(ht, ht_ref, FWD32, torch.float32, "final state")
    o2, none = recurrent_kda(*xs, initial_state=h0, backend="triton")
    assert none is None and torch.equal(o2, o)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_half_inputs(dtype):
    dev = _device()
    xs, _ = make_inputs(2, 4, 2, 2, 16, 32, device=dev)
    h0 = torch.randn(2, 2, 16, 32, device=dev)
    o, ht = recurrent_kda(*_cast(xs, dtype), initial_state=h0, output_final_state=True, scale=0.3, backend="triton")
    assert o.dtype == dtype and ht.dtype == torch.float32
    o_ref, ht_ref = ref64(*_cast(xs, dtype), None, initial_state=h0, output_final_state=True, scale=0.3)
    assert_close(o, o_ref, "kernel_fwd", dtype, "o")
    assert_close(ht, ht_ref, "kernel_fwd", dtype, "final state")


@needs_triton
def test_kernel_non_power_of_two_dims_and_varlen():
    dev = _device()
    K, V = 12, 20  # masks on both axes, V split into two tiles below
    xs, _ = make_inputs(1, 7, 1, 2, K, V, device=dev)
    cu = torch.tensor([0, 3, 3, 4, 7], device=dev)  # includes an empty sequence
    h0 = torch.randn(4, 2, K, V, device=dev)
    from kimi_linear.ops.kda.contract import check_kda_inputs
    from kimi_linear.ops.kda.recurrent import _recurrent_triton

    shape = check_kda_inputs(*xs, cu_seqlens=cu)
    for BV in (16, 32):  # tile narrower than V, and one tile wider than V
        o, ht = _recurrent_triton(*xs, shape=shape, scale=K**-0.5, initial_state=h0, output_final_state=True,
                                  cu_seqlens=cu, fusion=None, state_indices=None, BV=BV)
        o_ref, ht_ref = ref64(*xs, None, initial_state=h0, output_final_state=True, cu_seqlens=cu)
        assert_close(o, o_ref, FWD32, torch.float32, f"o BV={BV}")
        assert_close(ht, ht_ref, FWD32, torch.float32, f"final state BV={BV}")
        assert torch.equal(ht[1], h0[1]), "an empty sequence must hand its initial state through unchanged"


@needs_triton
@pytest.mark.parametrize("gate_scale", [1.0, 1e4])
def test_fused_options(gate_scale, poisoned_alloc):
    dev = _device()
    xs, fusion = make_inputs(2, 3, 2, 4, 16, 16, device=dev, fused=True, gate_scale=gate_scale)
    h0 = torch.randn(2, 4, 16, 16, device=dev)
    o, ht = recurrent_kda(*xs, fusion=fusion, initial_state=h0, output_final_state=True, backend="triton")
    o_ref, ht_ref = ref64(*xs, fusion, initial_state=h0, output_final_state=True)
    assert_close(o, o_ref, FWD32, torch.float32, "o (fused)")
    assert_close(ht, ht_ref, FWD32, torch.float32, "final state (fused)")


@needs_triton
@pytest.mark.parametrize("beta_value", [0.0, 1.0])
def test_extreme_gates_and_beta(beta_value):
    dev = _device()
    xs, _ = make_inputs(2, 4, 1, 2, 16, 16, device=dev)
    q, k, v, g, beta = xs
    g = torch.where(torch.rand_like(g) < 0.5, torch.full_like(g, -1e4), g)  # half the channels wiped out
    beta = torch.full_like(beta, beta_value)
    h0 = torch.randn(2, 2, 16, 16, device=dev)
    o, ht = recurrent_kda(q, k, v, g, beta, initial_state=h0, output_final_state=True, backend="triton")
    assert torch.isfinite(o).all() and torch.isfinite(ht).all()
    o_ref, ht_ref = ref64(q, k, v, g, beta, None, initial_state=h0, output_final_state=True)
    assert_close(o, o_ref, FWD32, torch.float32, "o")
    assert_close(ht, ht_ref, FWD32, torch.float32, "final state")


def _pool_case(dev, *, varlen: bool, fused: bool):
    HV, K, V, P = 2, 16, 16, 7
    if varlen:
        xs, fusion = make_inputs(1, 6, 1, HV, K, V, device=dev, fused=fused)
        cu = torch.tensor([0, 2, 3, 3, 6], device=dev)
        idx = torch.tensor([5, -1, 0, 2])
    else:
        xs, fusion = make_inputs(4, 2, 1, HV, K, V, device=dev, fused=fused)
        cu = None
        idx = torch.tensor([3, 6, -1, 1])
    pool = torch.randn(P, HV, K, V, device=dev)
    return xs, fusion, cu, idx, pool


@needs_triton
@pytest.mark.parametrize("varlen", [False, True])
@pytest.mark.parametrize("fused", [False, True])
def test_state_pool_in_place(varlen, fused, poisoned_alloc):
    dev = _device()
    xs, fusion, cu, idx, pool = _pool_case(dev, varlen=varlen, fused=fused)
    before = pool.clone()
    pool_ref = pool.clone()
    o, ret = recurrent_kda(*xs, fusion=fusion, initial_state=pool, state_indices=idx, cu_seqlens=cu,
                           output_final_state=True, backend="triton")
    assert ret is pool, "the pool itself is returned (updated in place)"
    o_ref, _ = recurrent_kda(*xs, fusion=fusion, initial_state=pool_ref, state_indices=idx, cu_seqlens=cu,
                             backend="reference")
    live = sorted(i for i in idx.tolist() if i >= 0)
    untouched = [s for s in range(pool.shape[0]) if s not in live]
    assert torch.equal(pool[untouched], before[untouched]), "slots nobody names must stay bit-identical"
    assert torch.equal(pool_ref[untouched], before[untouched])
    assert_close(pool[live], pool_ref[live], FWD32, torch.float32, "updated slots")
    assert_close(o, o_ref, FWD32, torch.float32, "o")
    assert not torch.equal(pool[live], before[live]), "live slots must have been written"


def test_reference_pool_semantics():
    """The reference pool path == running each sequence alone from its slot's state."""
    xs, _, cu, idx, pool = _pool_case(torch.device("cpu"), varlen=True, fused=False)
    q, k, v, g, beta = xs
    expect = pool.clone()
    o, _ = recurrent_kda(*xs, initial_state=pool, state_indices=idx, cu_seqlens=cu, backend="reference")
    offs = cu.tolist()
    for n, slot in enumerate(idx.tolist()):
        s, e = offs[n], offs[n + 1]
        if slot < 0:
            assert torch.equal(o[:, s:e], torch.zeros_like(o[:, s:e])), "padding rows give zeros"
            continue
        o_n, ht_n = recurrent_kda_ref(q[:, s:e], k[:, s:e], v[:, s:e], g[:, s:e], beta[:, s:e],
                                      initial_state=expect[slot:slot + 1], output_final_state=True)
        expect[slot] = ht_n[0]
        assert rel_rms(o[:, s:e], o_n) < 1e-6
    assert torch.allclose(pool, expect, rtol=0, atol=1e-6)


def test_auto_on_cpu_is_reference():
    xs, _ = make_inputs(2, 3, 1, 1, 8, 8, device=torch.device("cpu"))
    o_auto, s_auto = recurrent_kda(*xs, output_final_state=True)
    o_ref, s_ref = recurrent_kda_ref(*xs, output_final_state=True)
    assert torch.equal(o_auto, o_ref) and torch.equal(s_auto, s_ref)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_pool_validation(backend):
    if backend == "triton" and not triton_usable_on(_device()):
        pytest.skip("Triton unusable here")
    dev = _device()
    xs, _, _, idx, pool = _pool_case(dev, varlen=False, fused=False)
    call = lambda **kw: recurrent_kda(*xs, backend=backend, **kw)
    with pytest.raises(ValueError, match=r"\[P, HV, K, V\]"):
        call(initial_state=pool[:, :1], state_indices=idx)
    with pytest.raises(TypeError, match="float32"):
        call(initial_state=pool.double(), state_indices=idx)
    with pytest.raises(ValueError, match="< pool size P=7"):
        call(initial_state=pool, state_indices=torch.tensor([0, 1, 2, 7]))
    with pytest.raises(ValueError, match="more than once"):
        call(initial_state=pool, state_indices=torch.tensor([2, 1, -1, 2]))
    with pytest.raises(ValueError, match=r"\[N\] = \[4\]"):
        call(initial_state=pool, state_indices=torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="int32 or int64"):
        call(initial_state=pool, state_indices=torch.tensor([0.0, 1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="needs the state pool"):
        call(state_indices=idx)
    # Nothing was written by the rejected calls.
    assert torch.isfinite(pool).all()


def test_fp64_runs_in_reference_under_auto():
    xs, _ = make_inputs(1, 2, 1, 1, 8, 8, device=torch.device("cpu"))
    o, s = recurrent_kda(*[x.double() for x in xs], output_final_state=True)
    assert o.dtype == torch.float64
    o_ref, s_ref = recurrent_kda_ref(*[x.double() for x in xs], output_final_state=True)
    assert_close(o, o_ref, "ref", torch.float64, "o")
    assert_close(s, s_ref, "ref", torch.float64, "final state")


# ------------------------------------------------------------------------------------------------
# GPU: full decode sizes
# ------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("T", [1, 4])
def test_gpu_decode_pool_full_size(dtype, fused, T, cuda_device):
    B, H, K, V, P = 64, 32, 128, 128, 96
    xs, fusion = make_inputs(B, T, H, H, K, V, device=cuda_device, fused=fused)
    xs = _cast(xs, dtype)
    if fused:
        xs = [*xs[:3], xs[3].to(dtype), xs[4]]  # raw gate projection in the activation dtype, as the layer has it
    pool = torch.randn(P, H, K, V, device=cuda_device) * 0.1
    idx = torch.randperm(P)[:B]
    idx[::9] = -1  # some padding rows
    before = pool.clone()
    o, _ = recurrent_kda(*xs, fusion=fusion, initial_state=pool, state_indices=idx.to(cuda_device))
    live = idx[idx >= 0].tolist()
    gathered = before[idx.clamp(min=0)]
    o_ref, ht_ref = ref64(*xs, fusion, initial_state=gathered, output_final_state=True)
    keep = (idx >= 0).to(cuda_device)
    assert torch.isfinite(o).all()
    assert torch.equal(o[~keep], torch.zeros_like(o[~keep]))
    assert_close(o[keep], o_ref[keep], "kernel_fwd", dtype, "o")
    assert_close(pool[live], ht_ref[keep], "kernel_fwd", dtype, "pool slots")
    untouched = sorted(set(range(P)) - set(live))
    assert torch.equal(pool[untouched], before[untouched])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_varlen_long_and_extreme(dtype, cuda_device):
    H, HV, K, V = 4, 8, 128, 128
    xs, _ = make_inputs(1, 700, H, HV, K, V, device=cuda_device)
    q, k, v, g, beta = _cast(xs, dtype)
    g = torch.where(torch.rand_like(g) < 0.05, torch.full_like(g, -1e4), g)
    beta[:, ::7] = 0.0
    beta[:, 3::7] = 1.0
    cu = torch.tensor([0, 1, 300, 300, 650, 700], device=cuda_device)
    h0 = torch.randn(5, HV, K, V, device=cuda_device) * 0.1
    o, ht = recurrent_kda(q, k, v, g, beta, initial_state=h0, output_final_state=True, cu_seqlens=cu)
    o_ref, ht_ref = ref64(q, k, v, g, beta, None, initial_state=h0, output_final_state=True, cu_seqlens=cu)
    assert_close(o, o_ref, "kernel_fwd", dtype, "o")
    assert_close(ht, ht_ref, "kernel_fwd", dtype, "final state")
    # a sequence alone == the same sequence inside the pack
    s, e = 300, 650
    o1, ht1 = recurrent_kda(q[:, s:e], k[:, s:e], v[:, s:e], g[:, s:e], beta[:, s:e], initial_state=h0[3:4],
                            output_final_state=True)
    assert torch.equal(o1, o[:, s:e]) and torch.equal(ht1[0], ht[3])
