"""The on-chip inference forward of chunked KDA (``ops/kda/chunk_onchip.py``): one launch, 16-token chunks,
the state in registers. Interpreter tests at small sizes (fp32 / fp16: the interpreter's bf16 dots are
wrong), GPU tests at K = V = 128; every buffer NaN-poisoned (the module's autouse fixture)."""

from __future__ import annotations

import pytest
import torch

from kimi_linear.ops.kda import chunk_common
from kimi_linear.ops.kda.chunk import chunk_kda
from kimi_linear.ops.kda.fusion import KDAFusion
from kimi_linear.ops.kda.reference import chunk_kda_ref
from tests.numerics import rel_rms, tolerance
from tests.ops.test_chunk_kda import compare, make_inputs, use_variant, watch_launches

pytest.importorskip("triton")


@pytest.fixture(autouse=True)
def _poison(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chunk_common, "POISON", True)


def _onchip(monkeypatch, **switches) -> list:
    """Switch the on-chip forward on for every size (unless ``switches`` say otherwise) and record which
    forward kernels run."""
    from kimi_linear.ops.kda import chunk_fwd, chunk_onchip

    use_variant(monkeypatch, "onchip", **{"on": 1, "min_rows": 0, **switches})
    ran = watch_launches(monkeypatch, chunk_onchip, ("_onchip_fwd_kernel",))
    return watch_launches(monkeypatch, chunk_fwd, ("_gram_diag_kernel", "_state_fwd_kernel"), ran)


def _forward(inp, dtype, *, fuse, cu=None, h0=True, device="cpu"):
    """(kernel o, kernel final state, fp64 reference o, reference final state) of one no-grad forward."""
    args = [inp[n] for n in ("q", "k", "v", "g", "beta")]
    state = inp["h0"] if h0 else None
    fus64 = KDAFusion(qk_l2norm=True, beta_sigmoid=True, A_log=inp["A_log"].double(),
                      dt_bias=inp["dt_bias"].double()) if fuse else None
    ref = chunk_kda_ref(*[a.double() for a in args], initial_state=state.double() if h0 else None,
                        output_final_state=True, cu_seqlens=cu, fusion=fus64)
    fus = KDAFusion(qk_l2norm=True, beta_sigmoid=True, A_log=inp["A_log"], dt_bias=inp["dt_bias"]) if fuse else None
    with torch.no_grad():
        o, ht = chunk_kda(*[a.to(dtype) for a in args], initial_state=state, output_final_state=True, cu_seqlens=cu,
                          fusion=fus, backend="triton")
    return o, ht, ref[0], ref[1]


# (B, T, H, HV, K, V, cu_seqlens, initial state, fusion): key blocks of 32 -> 1, 2 and 4 state blocks,
# odd lengths, empty and one-token sequences, GVA
CASES = [
    (1, 17, 1, 1, 16, 16, None, True, False),
    (1, 100, 2, 4, 16, 16, [0, 0, 1, 37, 100], True, True),
    (1, 130, 1, 1, 32, 32, [0, 66, 130], False, True),
    (2, 40, 1, 2, 64, 32, None, True, True),
    (1, 33, 1, 1, 128, 16, None, True, False),
    (1, 50, 1, 2, 48, 24, [0, 20, 50], True, True),  # K, V not powers of two
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}T{c[1]}H{c[2]}HV{c[3]}K{c[4]}V{c[5]}"
                         f"{'-varlen' if c[6] else ''}{'-h0' if c[7] else ''}{'-fused' if c[8] else ''}")
def test_onchip_interpreter_matches_reference(case, monkeypatch):
    B, T, H, HV, K, V, offsets, h0, fuse = case
    ran = _onchip(monkeypatch)
    cu = torch.tensor(offsets, dtype=torch.int32) if offsets else None
    inp = make_inputs(B, T, H, HV, K, V, N=len(offsets) - 1 if offsets else None, fuse=fuse, h0=h0)
    o, ht, ref_o, ref_ht = _forward(inp, torch.float32, fuse=fuse, cu=cu, h0=h0)
    compare({"o": o, "ht": ht}, {"o": ref_o, "ht": ref_ht}, torch.float32)
    # one launch: the multi-launch forward's kernels did not run
    assert [name for name, _ in ran] == ["_onchip_fwd_kernel"]


def test_onchip_interpreter_half_inputs_and_v_tiles(monkeypatch):
    # fp16 inputs; and V in two tiles of 16 (each program redoes the chunk's pairs for its columns)
    inp = make_inputs(1, 70, 1, 2, 32, 32, N=2, fuse=True, h0=True, seed=4)
    cu = torch.tensor([0, 29, 70], dtype=torch.int32)
    for bv, dtype in ((None, torch.float16), (16, torch.float32)):
        ran = _onchip(monkeypatch, BV=bv)
        o, ht, ref_o, ref_ht = _forward(inp, dtype, fuse=True, cu=cu)
        compare({"o": o, "ht": ht}, {"o": ref_o, "ht": ref_ht}, dtype)
        assert ran[-1][0] == "_onchip_fwd_kernel" and ran[-1][1]["BV"] == (bv or 32)


def test_onchip_interpreter_aligned_keys(monkeypatch):
    # nearly equal keys, no decay, beta 1: A's entries are ~1, so every power A^n of the chunk's 16 x 16
    # matrix (n < 16) matters in (I + A)^-1 -- random keys leave A^8 far below any tolerance
    _onchip(monkeypatch)
    inp = make_inputs(1, 48, 1, 1, 16, 16, h0=True, seed=9)
    base = torch.nn.functional.normalize(torch.randn(16, generator=torch.Generator().manual_seed(1)), dim=0)
    inp["k"] = torch.nn.functional.normalize(base + 0.05 * inp["k"], dim=-1)
    inp["g"] = inp["g"] * 1e-3
    inp["beta"] = torch.ones_like(inp["beta"])
    o, ht, ref_o, ref_ht = _forward(inp, torch.float32, fuse=False)
    # (the interpreter's fp32 is exact fp32: the multi-launch forward's substitution gets 1.4e-7 here,
    # the product inverse without its Newton step 1.3e-4)
    assert rel_rms(o, ref_o) <= 1e-6 and rel_rms(ht, ref_ht) <= 1e-6, (rel_rms(o, ref_o), rel_rms(ht, ref_ht))


def check_extreme(device, dtype):
    """Gates down to -1e4 per token (log-decay input) and raw gates that make softplus overflow-prone,
    beta exactly 0 and 1: every output finite and equal to the reference."""
    inp = make_inputs(1, 150, 1, 2, 32, 32, h0=True, device=device, seed=3)
    big = torch.rand(inp["g"].shape, device=device) < 0.3
    inp["g"] = torch.where(big, torch.full_like(inp["g"], -1e4), inp["g"])
    inp["beta"] = (torch.rand(inp["beta"].shape, device=device) < 0.5).float()
    o, ht, ref_o, ref_ht = _forward(inp, dtype, fuse=False, device=device)
    assert torch.isfinite(o).all() and torch.isfinite(ht).all()
    compare({"o": o, "ht": ht}, {"o": ref_o, "ht": ref_ht}, dtype, interp_tol=False)
    fused = make_inputs(1, 150, 1, 2, 32, 32, h0=True, fuse=True, device=device, seed=5)
    fused["g"] = fused["g"] * 40  # raw gates of +-100s: softplus far into both tails
    fused["A_log"] = fused["A_log"] + 4  # A up to ~e^5
    o, ht, ref_o, ref_ht = _forward(fused, dtype, fuse=True, device=device)
    assert torch.isfinite(o).all() and torch.isfinite(ht).all()
    compare({"o": o, "ht": ht}, {"o": ref_o, "ht": ref_ht}, dtype, interp_tol=False)


def test_onchip_interpreter_extreme_gates_and_beta(monkeypatch):
    _onchip(monkeypatch)
    check_extreme("cpu", torch.float32)


def test_onchip_interpreter_causal_and_empty(monkeypatch):
    ran = _onchip(monkeypatch)
    inp = make_inputs(1, 80, 1, 1, 16, 16)
    t0 = 37
    args = [inp[n].clone() for n in ("q", "k", "v", "g", "beta")]
    with torch.no_grad():
        o1, _ = chunk_kda(*args, backend="triton")
        for i, name in enumerate(("q", "k", "v", "g", "beta")):
            args[i][:, t0:] = args[i][:, t0:] * 3 if name == "g" else args[i][:, t0:].flip(1) * 0.5
        o2, _ = chunk_kda(*args, backend="triton")
        assert torch.equal(o1[:, :t0], o2[:, :t0])
        assert not torch.equal(o1[:, t0:], o2[:, t0:])
        # no tokens: the final state is the initial state
        empty = make_inputs(2, 0, 1, 1, 16, 16, h0=True)
        o, ht = chunk_kda(*[empty[n] for n in ("q", "k", "v", "g", "beta")], initial_state=empty["h0"],
                          output_final_state=True, backend="triton")
    assert o.shape == (2, 0, 1, 16)
    torch.testing.assert_close(ht, empty["h0"])
    assert {name for name, _ in ran} == {"_onchip_fwd_kernel"}


def test_onchip_dispatch(monkeypatch):
    """Taken only when switched on, for a forward no backward follows, with at least min_rows sequences x
    value heads; the multi-launch forward otherwise, with the same result."""
    inp = make_inputs(1, 40, 1, 2, 16, 16, fuse=True, h0=True)
    args = [inp[n] for n in ("q", "k", "v", "g", "beta")]
    fus = KDAFusion(qk_l2norm=True, beta_sigmoid=True, A_log=inp["A_log"], dt_bias=inp["dt_bias"])
    kw = dict(initial_state=inp["h0"], output_final_state=True, fusion=fus, backend="triton")
    ran = _onchip(monkeypatch, min_rows=3)  # 1 sequence x 2 value heads: too few
    with torch.no_grad():
        multi = chunk_kda(*args, **kw)
    assert "_onchip_fwd_kernel" not in {name for name, _ in ran}
    use_variant(monkeypatch, "onchip", min_rows=2)
    ran.clear()
    with torch.no_grad():
        one = chunk_kda(*args, **kw)
    assert {name for name, _ in ran} == {"_onchip_fwd_kernel"}
    for a, b in zip(one, multi):
        assert rel_rms(a, b.double()) <= tolerance("kernel_interp", torch.float32)
    ran.clear()
    chunk_kda(*[a.clone().requires_grad_() for a in args], **kw)  # a backward may follow: multi-launch
    assert "_onchip_fwd_kernel" not in {name for name, _ in ran}
    use_variant(monkeypatch, "onchip", on=0)
    ran.clear()
    with torch.no_grad():
        chunk_kda(*args, **kw)
    assert "_onchip_fwd_kernel" not in {name for name, _ in ran}


GPU_DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("tiles", [(32, None, 4), (32, None, 8), (32, 64, 4), (64, None, 8)],
                         ids=["BK32-4w", "BK32-8w", "BK32-BV64", "BK64-8w"])
def test_onchip_gpu_fused_varlen(cuda_device, dtype, tiles, monkeypatch):
    # K = V = 128: odd lengths, an empty sequence, GVA, initial states, the layer's fused options
    ran = _onchip(monkeypatch, BK=tiles[0], BV=tiles[1], num_warps=tiles[2])
    offsets = [0, 1000, 1000, 4133, 4200]
    cu = torch.tensor(offsets, dtype=torch.int32, device=cuda_device)
    inp = make_inputs(1, offsets[-1], 4, 8, 128, 128, N=4, fuse=True, h0=True, device=cuda_device)
    o, ht, ref_o, ref_ht = _forward(inp, dtype, fuse=True, cu=cu, device=cuda_device)
    compare({"o": o, "ht": ht}, {"o": ref_o, "ht": ref_ht}, dtype)
    assert {name for name, _ in ran} == {"_onchip_fwd_kernel"}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
def test_onchip_gpu_extreme(cuda_device, dtype, monkeypatch):
    _onchip(monkeypatch)
    check_extreme(cuda_device, dtype)
