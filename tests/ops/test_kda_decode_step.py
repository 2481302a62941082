"""kda_decode_step (one Triton launch: up-projections, recurrence, gated norm) against its reference,
the unfused composition of F.linear, recurrent_kda's reference and gated_rms_norm.

CPU: the kernel runs under TRITON_INTERPRET=1 (tests/ops/conftest.py) at small sizes, fp32 and fp16
(the interpreter's bf16 is unreliable). GPU (``-m gpu``): the benchmark model's KDA geometry (32 heads
of 128, rank 128) in bf16 / fp16 / fp32, batch 1 and a padded batch.
"""

from __future__ import annotations

import pytest
import torch

from kimi_linear.ops.kda.decode_step import kda_decode_step, kda_decode_step_ref
from tests.numerics import rel_rms


def make_step(N, H, HV, K, V, RF, RG, *, P=None, device, dtype, gate_shift=0.0, seed=0):
    """Random raw inputs (as the input projections make them), weights and a random state pool."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)
    P = P if P is not None else N + 2
    acts = dict(q=r(N, H * K), k=r(N, H * K), v=r(N, HV * V), gate_a=r(N, RF), out_gate_a=r(N, RG),
                beta=r(N, HV) * 2)
    acts = {n: t.to(device=device, dtype=dtype) for n, t in acts.items()}
    params = dict(gate_b_weight=r(HV * K, RF) * RF ** -0.5 + gate_shift, out_gate_b_weight=r(HV * V, RG) * RG ** -0.5,
                  norm_weight=1.0 + 0.1 * r(V))
    params = {n: t.to(device=device, dtype=dtype) for n, t in params.items()}
    params.update(A_log=(r(HV) * 0.5).to(device), dt_bias=(r(HV * K) * 0.5).to(device))
    pool = (r(P, HV, K, V) * 0.3).to(device)
    return acts, params, pool


def run_both(acts, params, pool, idx, H, K, eps=1e-5, **kw):
    """(kernel output, kernel pool, reference output, reference pool), each on its own copy of the pool;
    ``kw``: the kernel's launch settings."""
    pool_k, pool_r = pool.clone(), pool.clone()
    y_k = kda_decode_step(**acts, **params, eps=eps, state_pool=pool_k, state_indices=idx, num_heads=H,
                          head_k_dim=K, backend="triton", **kw)
    y_r = kda_decode_step_ref(**acts, **params, eps=eps, state_pool=pool_r, state_indices=idx, num_heads=H,
                              head_k_dim=K)
    return y_k, pool_k, y_r, pool_r


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(3, 2, 2, 16, 16, 16, 16), (2, 2, 4, 16, 32, 8, 24), (1, 1, 1, 20, 12, 6, 10)],
                         ids=["square", "gva_rect", "non_pow2"])
@pytest.mark.parametrize("BV", [4, 64], ids=["tiles", "whole_head"])
def test_kernel_matches_composition(triton_device, poisoned_alloc, dtype, shape, BV):
    # BV=4: several column tiles per head (the last one to finish normalises the head; V=12: 3 tiles);
    # BV=64: one program per head
    N, H, HV, K, V, RF, RG = shape
    acts, params, pool = make_step(N, H, HV, K, V, RF, RG, device=triton_device, dtype=dtype)
    idx = torch.arange(N, device=triton_device).flip(0) + 1  # slots 1..N, reversed; slot 0 and P-1 unused
    y_k, pool_k, y_r, pool_r = run_both(acts, params, pool, idx, H, K, BV=BV)
    tol = 2e-5 if dtype == torch.float32 else 4e-3
    assert torch.isfinite(y_k).all()
    assert rel_rms(y_k.float(), y_r.float()) < tol
    # the state is fp32 either way; in fp16 a rounded gate whose fp32 sum lands one ulp apart moves it
    assert rel_rms(pool_k, pool_r) < (2e-5 if dtype == torch.float32 else 1e-3)
    assert torch.equal(pool_k[0], pool[0]) and torch.equal(pool_k[-1], pool[-1])  # untouched slots


def test_padding_rows_leave_state_and_give_zero(triton_device, poisoned_alloc):
    acts, params, pool = make_step(3, 2, 2, 16, 16, 8, 8, P=4, device=triton_device, dtype=torch.float32)
    idx = torch.tensor([2, -1, 0], device=triton_device)
    y_k, pool_k, y_r, pool_r = run_both(acts, params, pool, idx, 2, 16, BV=8)
    assert torch.equal(y_k[1], torch.zeros_like(y_k[1]))
    assert torch.equal(pool_k[1], pool[1]) and torch.equal(pool_k[3], pool[3])
    assert rel_rms(y_k, y_r) < 2e-5 and rel_rms(pool_k, pool_r) < 2e-5


@pytest.mark.parametrize("shift", [-60.0, 60.0], ids=["gate_closed", "gate_open"])
def test_extreme_gates_stay_finite(triton_device, shift):
    """Raw gates far below / above softplus's threshold: decay 1 or e^(-huge) = 0, no NaN / Inf."""
    acts, params, pool = make_step(2, 2, 2, 16, 16, 8, 8, device=triton_device, dtype=torch.float32, gate_shift=shift)
    acts["gate_a"] = acts["gate_a"].abs() + 1.0  # f_b f_a = shift * sum(f_a) + noise: large, of one sign
    idx = torch.tensor([0, 1], device=triton_device)
    y_k, pool_k, y_r, pool_r = run_both(acts, params, pool, idx, 2, 16, BV=8)
    assert torch.isfinite(y_k).all() and torch.isfinite(pool_k).all()
    assert rel_rms(y_k, y_r) < 2e-5 and rel_rms(pool_k, pool_r) < 2e-5


def test_repeated_steps_keep_counters_at_zero(triton_device):
    """Three steps in a row on one pool (the per-head counters must be back at zero after each call)
    against three reference steps."""
    from kimi_linear.ops.kda import decode_step_kernel

    acts, params, pool = make_step(2, 2, 2, 16, 16, 8, 8, device=triton_device, dtype=torch.float32)
    idx = torch.tensor([1, 0], device=triton_device)
    pool_k, pool_r = pool.clone(), pool.clone()
    for step in range(3):
        kw = dict(acts, v=acts["v"] * (step + 1))
        y_k = kda_decode_step(**kw, **params, eps=1e-5, state_pool=pool_k, state_indices=idx, num_heads=2,
                              head_k_dim=16, backend="triton", BV=4)
        y_r = kda_decode_step_ref(**kw, **params, eps=1e-5, state_pool=pool_r, state_indices=idx, num_heads=2,
                                  head_k_dim=16)
        assert rel_rms(y_k, y_r) < 2e-5 and rel_rms(pool_k, pool_r) < 2e-5, f"step {step}"
    counters = decode_step_kernel._COUNTERS[(pool_k.device, pool_k.data_ptr())]
    assert int(counters.abs().sum()) == 0


def test_bad_inputs_raise_and_leave_pool(triton_device):
    acts, params, pool = make_step(2, 2, 2, 16, 16, 8, 8, device=triton_device, dtype=torch.float32)
    before = pool.clone()
    idx = torch.tensor([0, 1])
    call = lambda **over: kda_decode_step(**{**acts, **params, **over}, eps=1e-5, state_pool=pool,
                                          state_indices=over.pop("idx", idx), num_heads=2, head_k_dim=16,
                                          backend="triton")
    with pytest.raises(ValueError, match="gate_b_weight"):
        call(gate_b_weight=params["gate_b_weight"][:-1])
    with pytest.raises(ValueError, match="rows"):
        call(v=acts["v"][:1])
    with pytest.raises(ValueError, match="q must be"):
        call(q=acts["q"][:, :-1], k=acts["k"][:, :-1])
    with pytest.raises(TypeError, match="one floating dtype"):
        call(v=acts["v"].half())
    with pytest.raises(ValueError, match="more than once"):
        kda_decode_step(**acts, **params, eps=1e-5, state_pool=pool, state_indices=torch.tensor([1, 1]),
                        num_heads=2, head_k_dim=16, backend="triton")
    assert torch.equal(pool, before)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("N", [1, 5])
@pytest.mark.parametrize("BV", [None, 128], ids=["default_tiles", "whole_head"])
def test_gpu_benchmark_geometry(cuda_device, poisoned_alloc, dtype, N, BV):
    acts, params, pool = make_step(N, 32, 32, 128, 128, 128, 128, P=N + 3, device=cuda_device, dtype=dtype)
    idx = torch.tensor([N + 2 - i if i != 1 else -1 for i in range(N)], device=cuda_device)
    y_k, pool_k, y_r, pool_r = run_both(acts, params, pool, idx, 32, 128, BV=BV)
    # the kernel's fp32 sums vs cuBLAS's half-precision F.linear outputs: a flipped last bit in a rounded
    # gate moves a few outputs by an ulp; fp32 runs the same arithmetic in a different order
    tol = 2e-5 if dtype == torch.float32 else (2e-2 if dtype == torch.bfloat16 else 3e-3)
    assert torch.isfinite(y_k).all()
    assert rel_rms(y_k.float(), y_r.float()) < tol
    assert rel_rms(pool_k, pool_r) < (2e-5 if dtype == torch.float32 else 5e-3)
    if N > 1:
        assert torch.equal(y_k[1], torch.zeros_like(y_k[1]))
