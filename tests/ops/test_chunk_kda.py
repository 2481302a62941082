"""Triton ``chunk_kda`` against the fp64 reference: outputs, final states and every gradient.

CPU (CI): the kernels run through Triton's interpreter (``tests/ops/conftest.py`` sets
``TRITON_INTERPRET=1`` before any kernel module is imported) at tiny sizes, fp32 inputs.
GPU (``pytest -m gpu``): full sizes, bf16 / fp16 / fp32. Every buffer the kernels allocate starts as
NaN (``chunk_common.POISON``), so an unwritten element cannot pass; tolerances come from
``tests/numerics.py``.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from kimi_linear.ops.kda import chunk_common
from kimi_linear.ops.kda.chunk import chunk_kda
from kimi_linear.ops.kda.fusion import KDAFusion
from kimi_linear.ops.kda.gate import l2norm
from kimi_linear.ops.kda.reference import chunk_kda_ref
from tests.numerics import rel_rms, tolerance

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from kimi_linear.ops.kda import chunk_bwd  # noqa: E402
from kimi_linear.ops.kda.chunk_bwd import tf32_nearest  # noqa: E402


@triton.jit
def _tf32_nearest_kernel(x, y, N: tl.constexpr):
    o = tl.arange(0, N)
    tl.store(y + o, tf32_nearest(tl.load(x + o)))


@pytest.fixture(autouse=True)
def _poison(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chunk_common, "POISON", True)


def make_inputs(B, T, H, HV, K, V, *, N=None, fuse=False, h0=False, gate_scale=5.0, device="cpu", seed=0):
    """fp32 inputs (and upstream grads) for one case; the fused case holds raw q/k/gate/logits."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    if fuse:
        q, k, g, beta = r(B, T, H, K), r(B, T, H, K), 2 * r(B, T, HV, K), r(B, T, HV)
        extra = dict(A_log=0.5 * r(HV), dt_bias=0.5 * r(HV * K))
    else:
        q, k = l2norm(r(B, T, H, K)), l2norm(r(B, T, H, K))
        g = -gate_scale * torch.rand(B, T, HV, K, generator=gen)
        beta = torch.rand(B, T, HV, generator=gen)
        extra = {}
    v = r(B, T, HV, V)
    n_states = N if N is not None else B
    state = r(n_states, HV, K, V) if h0 else None
    grads = dict(do=r(B, T, HV, V), dht=r(n_states, HV, K, V))
    t = dict(q=q, k=k, v=v, g=g, beta=beta, h0=state, **extra, **grads)
    return {key: (val.to(device) if val is not None else None) for key, val in t.items()}


def run_case(inp, *, dtype, fn, cu_seqlens=None, fuse=False, **kw):
    """Forward + backward with the upstream grads; returns a dict of outputs and input gradients."""
    sdtype = torch.float64 if dtype == torch.float64 else torch.float32
    # detach first: when dtype is the inputs' own, .to() returns the same tensor, and making the shared
    # inputs grad leaves would turn the next run's casts into non-leaves whose .grad stays None
    leaves = {n: inp[n].detach().to(dtype).requires_grad_() for n in ("q", "k", "v", "g", "beta")}
    h0 = inp["h0"].detach().to(sdtype).requires_grad_() if inp["h0"] is not None else None
    fusion = None
    if fuse:
        leaves["A_log"] = inp["A_log"].detach().to(sdtype).requires_grad_()
        leaves["dt_bias"] = inp["dt_bias"].detach().to(sdtype).requires_grad_()
        fusion = KDAFusion(qk_l2norm=True, beta_sigmoid=True, A_log=leaves["A_log"], dt_bias=leaves["dt_bias"])
    o, ht = fn(leaves["q"], leaves["k"], leaves["v"], leaves["g"], leaves["beta"], initial_state=h0,
               output_final_state=True, cu_seqlens=cu_seqlens, fusion=fusion, **kw)
    loss = (o.double() * inp["do"].double()).sum() + (ht.double() * inp["dht"].double()).sum()
    loss.backward()
    out = {"o": o.detach(), "ht": ht.detach()}
    out.update({"d" + n: t.grad for n, t in leaves.items()})
    if h0 is not None:
        out["dh0"] = h0.grad
    return out


def compare(out, ref, dtype, *, skip=(), interp_tol=True):
    missing = [n for n in ref if n not in skip and ref[n] is not None and out.get(n) is None]
    assert not missing, f"kernel returned no value for {missing} where the reference has one"
    errs = {}
    for name, r in ref.items():
        if name in skip:
            continue
        kind = "kernel_fwd" if name in ("o", "ht") else "kernel_bwd"
        if interp_tol and dtype == torch.float32 and out[name].device.type == "cpu" and name != "dA_log":
            # interpreter: true fp32 dots, so the tf32 allowance does not apply (dA_log is a
            # per-head sum with heavy cancellation: measured 1.3e-3, it keeps the GPU bound)
            kind = "kernel_interp"
        errs[name] = (rel_rms(out[name], r), tolerance(kind, dtype))
    bad = {n: e for n, e in errs.items() if not e[0] <= e[1]}
    assert not bad, "relative RMS error above tolerance: " + ", ".join(f"{n} {e:.2e} > {t:.1e}" for n, (e, t) in bad.items())


# (B, T, H, HV, K, V, cu_seqlens, initial state, fusion)
CPU_CASES = [
    (1, 1, 1, 1, 16, 16, None, False, False),
    (1, 17, 1, 1, 16, 16, None, True, False),
    (2, 64, 1, 2, 16, 32, None, False, True),
    (1, 100, 1, 2, 32, 16, [0, 0, 1, 37, 100], True, False),
    (1, 100, 2, 4, 16, 16, [0, 0, 1, 37, 100], True, True),
    (1, 130, 1, 1, 32, 32, [0, 66, 130], False, True),
]


_ALLOC = chunk_common.alloc


def count_allocations(monkeypatch, tally: Counter) -> None:
    """From here on in this test, every buffer the kernels' callers allocate is tallied in ``tally`` by
    (shape, dtype) (a later call switches to its own tally)."""
    def counting(shape, dtype, device):
        tally[(tuple(shape), dtype)] += 1
        return _ALLOC(shape, dtype, device)

    monkeypatch.setattr(chunk_common, "alloc", counting)


def use_variant(monkeypatch, kernel: str, **switches) -> None:
    """Select a launch-table variant of one kernel (e.g. state_bwd dw_local=1) for this test."""
    monkeypatch.setitem(chunk_common.LAUNCH, kernel, {**chunk_common.LAUNCH[kernel], **switches})


def check_case(case, dtype=torch.float32):
    """One CPU_CASES entry through the kernels (interpreter) against the fp64 reference."""
    B, T, H, HV, K, V, offsets, h0, fuse = case
    cu = torch.tensor(offsets, dtype=torch.int32) if offsets else None
    inp = make_inputs(B, T, H, HV, K, V, N=len(offsets) - 1 if offsets else None, fuse=fuse, h0=h0)
    ref = run_case(inp, dtype=torch.float64, fn=chunk_kda_ref, cu_seqlens=cu, fuse=fuse)
    out = run_case(inp, dtype=dtype, fn=chunk_kda, cu_seqlens=cu, fuse=fuse, backend="triton")
    compare(out, ref, dtype)


@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: f"B{c[0]}T{c[1]}H{c[2]}HV{c[3]}K{c[4]}V{c[5]}"
                         f"{'-varlen' if c[6] else ''}{'-h0' if c[7] else ''}{'-fused' if c[8] else ''}")
def test_chunk_kda_interpreter_matches_reference(case):
    check_case(case)


# Launch-table variants (the other cases run the defaults), each on the cases that reach its edges:
# (id, kernel, switches, CPU_CASES indices)
VARIANTS = [
    # the state-gradient scan's dO-only term computed first in a parallel kernel (the default keeps it
    # in the scan)
    ("state_bwd-dw_local", "state_bwd", dict(dw_local=1), (-2, -1)),
    # the diagonal gram with BH value heads per program (default 2), on a GVA case (heads of one program
    # may read different q/k heads) with sequences ending mid-sub-chunk
    ("gram_diag-BH1", "gram_diag", dict(BH=1), (-2,)),
    ("gram_diag-BH4", "gram_diag", dict(BH=4), (-2,)),
    # the diagonal blocks without the zeros stored above their diagonal (the default stores them)
    ("gram_diag-no_fill", "gram_diag", dict(fill=0), (-2, -1)),
    # the off-diagonal gram and the inverse in two launches (the default fuses them, Araw's off-diagonal
    # blocks stored for the backward only), on odd lengths and packed sequences with part chunks; and the
    # fused form's 16-wide key blocks (taken where programs are few)
    ("gram_solve-two_launches", "gram_solve", dict(on=0), (1, -2, -1)),
    ("gram_solve-BK16", "gram_solve", dict(BK=16, few_programs=0), (-2, -1)),
    # the output (step 5) computed inside the forward scan instead of its own kernel
    ("state_fwd-output_in_scan", "state_fwd", dict(output=1), (1, -2, -1)),
    # the solve's products in column blocks of 16 (more blocks than K / V here) or 32, against the
    # default 64 (one block wider than K = 32 / V = 16: masked columns)
    ("solve-BV16", "solve", dict(BV=16), (-2,)),
    ("solve-BV32", "solve", dict(BV=32), (-2,)),
    # the chunk-gradient kernel on two key blocks of 16 and 16-wide V tiles (partial sums of dA / dbeta
    # across blocks and the V-only program's slot), and with the V-only work inside key block 0's program
    # (v_apart=0; the default gives it a program of its own), at the default tiles and at BK 16
    ("chunk_grad-BK16", "chunk_grad", dict(BK=16, BV=16), (3, -1)),
    ("chunk_grad-v_in_block0", "chunk_grad", dict(v_apart=0), (3, -1)),
    ("chunk_grad-v_in_block0-BK16", "chunk_grad", dict(BK=16, BV=16, v_apart=0), (3, -1)),
    # the decay products' diagonal by the halving levels in every sub-chunk, unrolled (the default, tiered,
    # takes the fewest levels as a loop and then factors each remaining group through its midpoint: the
    # odd-T case factors every sub-chunk whole, the fused cases' larger gates take the tiers too;
    # check_graded_gates below takes every tier, and a mutation that drops any one fails it)
    ("decay_grad-levels", "decay_grad", dict(factored=0, rolled=0), (1, -2, -1)),
    # the factored diagonal through one reference (the first row; spans up to 60 factored)
    ("decay_grad-one-reference", "decay_grad", dict(factored=1), (1, -2, -1)),
    # the halving levels as a loop (runtime level sizes) in every sub-chunk
    ("decay_grad-rolled-levels", "decay_grad", dict(factored=0, rolled=1), (1, -1)),
    # the whole sub-chunk through its midpoint where the span allows (<= 120), the levels elsewhere (the
    # default tiers: the fewest levels, then each remaining group through its own midpoint)
    ("decay_grad-midpoint", "decay_grad", dict(factored=2), (1, -2, -1)),
    # the gate's cumsum with the q/k norm in one launch, and their backwards likewise (fused cases; the
    # backward merge applies without GVA only: case 2 is not fused, so the fused HV == H case below)
    ("gate-merge_l2norm", "gate", dict(merge_l2norm=1), (-2, -1)),
]


@pytest.mark.parametrize("name,kernel,switches,case", [
    pytest.param(name, kernel, switches, CPU_CASES[i], id=f"{name}-case{i % len(CPU_CASES)}")
    for name, kernel, switches, cases in VARIANTS for i in cases])
def test_chunk_kda_interpreter_launch_variant(name, kernel, switches, case, monkeypatch):
    use_variant(monkeypatch, kernel, **switches)
    check_case(case)


def test_chunk_kda_interpreter_value_heads_not_a_power_of_two():
    # HV = 3 value heads on one q/k head: the diagonal gram's head block (2) is only partly used
    check_case((1, 70, 1, 3, 16, 16, None, True, True))


HALF_CASE = (1, 100, 1, 2, 32, 32, [0, 0, 1, 37, 100], True, True)


def test_chunk_kda_interpreter_half_inputs():
    # fp16 takes the half-precision operand path of the scans (bf16 is GPU-only here: Triton 3.6's
    # interpreter computes bf16 dots wrongly).
    check_case(HALF_CASE, torch.float16)


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.float32, torch.float16)],
                         ids=["one-launch", "two-launches"])
def test_l2norm_pair_matches_autograd(dtypes):
    # q and k normalised (and their gradients) in one launch when shape and dtype agree, else one each;
    # against torch autograd of the same formula, with rows > one program's 16 and a zero row
    from kimi_linear.ops.kda.chunk_fwd import l2norm_fwd

    l2norm_bwd = chunk_bwd.l2norm_bwd
    gen = torch.Generator().manual_seed(3)
    xs = [torch.randn(37, 2, 24, generator=gen).to(dt) for dt in dtypes]
    xs[1][5, 1] = 0
    dys = [torch.randn(37, 2, 24, generator=gen) for _ in dtypes]
    got = l2norm_fwd(*xs)
    grads = l2norm_bwd(*[(y, r, dy, x.dtype) for (y, r), dy, x in zip(got, dys, xs)])
    for x, (y, r), dy, dx in zip(xs, got, dys, grads):
        xr = x.double().requires_grad_()
        yr = xr * torch.rsqrt((xr * xr).sum(-1, keepdim=True) + 1e-6)
        yr.backward(dy.double())
        tol = 1e-5 if x.dtype == torch.float32 else 2e-3
        assert y.dtype == x.dtype and dx.dtype == x.dtype
        assert torch.allclose(y.double(), yr.detach(), atol=tol)
        assert torch.allclose(r.double(), torch.rsqrt((xr.detach() ** 2).sum(-1) + 1e-6).reshape(-1), rtol=tol)
        assert torch.allclose(dx.double(), xr.grad, rtol=tol, atol=tol * 10)  # the zero row: dx = 1e3 dy


@pytest.mark.parametrize("merge", [(0, 1), (1, 1), (1, 0)], ids=["bwd", "fwd-bwd", "fwd"])
def test_chunk_kda_interpreter_l2norm_merged_launches(merge, monkeypatch):
    # the q/k norm in one launch with the gate's cumsum (gate merge_l2norm) and its backward in one launch
    # with the gate gradients (gate_grad merge_l2norm), on a fused case without GVA; the merged kernels
    # are watched to have run (and the separate l2norm kernels not)
    from kimi_linear.ops.kda import chunk_fwd

    use_variant(monkeypatch, "gate", merge_l2norm=merge[0])
    use_variant(monkeypatch, "gate_grad", merge_l2norm=merge[1])
    ran = []
    for mod, names in ((chunk_fwd, ("_prologue_kernel", "_l2norm_fwd_kernel")),
                       (chunk_bwd, ("_epilogue_kernel", "_l2norm_bwd_kernel"))):
        for name in names:
            kernel = getattr(mod, name)
            monkeypatch.setattr(mod, name, _Watched(kernel, name, ran))
    check_case((1, 100, 2, 2, 32, 32, [0, 0, 1, 37, 100], True, True))
    expect_fwd = "_prologue_kernel" if merge[0] else "_l2norm_fwd_kernel"
    expect_bwd = "_epilogue_kernel" if merge[1] else "_l2norm_bwd_kernel"
    assert sorted({name for name, _ in ran}) == sorted({expect_fwd, expect_bwd})


class _Watched:
    """A Triton kernel whose launches (``kernel[grid](...)``) are recorded in ``log`` as (name, keywords)."""

    def __init__(self, kernel, name, log):
        self.kernel, self.name, self.log = kernel, name, log

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.append((self.name, kwargs))
            return self.kernel[grid](*args, **kwargs)

        return launch


def watch_launches(monkeypatch, module, names, ran=None) -> list:
    """Record the launches of ``module``'s kernels ``names`` from here on in this test: the list of
    (name, keywords) they append to (``ran``, or a new one)."""
    ran = [] if ran is None else ran
    for name in names:
        monkeypatch.setattr(module, name, _Watched(getattr(module, name), name, ran))
    return ran


@pytest.mark.parametrize("half_dy", [0, 1])
def test_chunk_kda_interpreter_half_dy_ahead_of_l2norm(half_dy, monkeypatch):
    # dq / dk in the input dtype (fp16 here; the default) ahead of the fused l2norm backward, or fp32;
    # the l2norm backward's plan is watched to see which one it got
    seen = []
    real = chunk_bwd._l2norm_bwd_plan

    def watch(terms):
        seen.extend(t[2].dtype for t in terms)
        return real(terms)

    monkeypatch.setattr(chunk_bwd, "_l2norm_bwd_plan", watch)
    use_variant(monkeypatch, "l2norm", half_dy=half_dy)
    check_case((1, 100, 2, 2, 32, 32, [0, 0, 1, 37, 100], True, True), torch.float16)  # HV == H: no GVA sum
    assert seen == [torch.float16 if half_dy else torch.float32] * 2


HALF_STORE_CASES = {"aqk": ({"aqk"}, {}), "dw": ({"dw"}, {}), "dw-local": ({"dw"}, {"dw_local": 1}),
                    "dqk": ({"dqk"}, {}), "dqk-gva": ({"dqk"}, {})}
F16, F32 = torch.float16, torch.float32
# the interpreter case of each (T = 100 over 4 sequences, HV = 2, K = 32, V = 16; "dqk-gva" on one q/k
# head, so dq / dk still sum over the group in fp32 afterwards) and the buffers the switch must change:
# (case, allocated in half instead, no longer allocated, newly allocated)
HALF_STORE_CPU = {
    "aqk": ((1, 100, 2, 2, 32, 16), {(100, 2, 64): 1}, {(100, 2, 64): 1}, {}),
    "dw": ((1, 100, 2, 2, 32, 16), {(100, 2, 16): 1}, {(100, 2, 16): 1}, {}),
    "dw-local": ((1, 100, 2, 2, 32, 16), {(100, 2, 16): 1}, {(100, 2, 16): 1}, {}),
    # fp16 dq / dk (half_dy) completed in place: the two fp32 parts go, the fp16 outputs are the parts
    "dqk": ((1, 100, 2, 2, 32, 16), {}, {(100, 2, 32): 2}, {}),
    # fp32 outputs for the group sum: the parts in half, the outputs allocated apart
    "dqk-gva": ((1, 100, 1, 2, 32, 16), {(100, 2, 32): 2}, {}, {(100, 2, 32): 2}),
}


@pytest.mark.parametrize("case", list(HALF_STORE_CASES))
def test_chunk_kda_interpreter_half_stored_intermediates(case, monkeypatch):
    # Aqk, dW or the chunk-gradient kernel's dq / dk parts kept in half precision (bf16 on a GPU for
    # bf16 inputs; the interpreter runs fp16, so the rule is widened to fp16 here): every reader casts
    # back, and o, the states and every gradient stay inside the half tolerances against the fp64
    # reference (a dot reader without its cast fails to compile: fp16 x fp32). The forward and backward
    # allocate exactly the buffers the switch changes (HALF_STORE_CPU), so the half path really ran.
    half, extra = HALF_STORE_CASES[case]
    shape, to_half, gone_f32, new_f32 = HALF_STORE_CPU[case]
    if extra:
        use_variant(monkeypatch, "state_bwd", **extra)
    seen = {0: Counter(), 1: Counter()}
    for on in (0, 1):
        rule = (lambda what, dt: dt if what in half else F32) if on else (lambda what, dt: F32)
        monkeypatch.setattr(chunk_common, "stored_dtype", rule)
        count_allocations(monkeypatch, seen[on])
        check_case((*shape, [0, 0, 1, 37, 100], True, True), F16)
    added = Counter({(s, F16): n for s, n in to_half.items()}) + Counter({(s, F32): n for s, n in new_f32.items()})
    removed = Counter({(s, F32): n for s, n in {**to_half, **gone_f32}.items()})
    assert seen[1] - seen[0] == added - removed
    assert seen[0] - seen[1] == removed - added


@pytest.mark.parametrize("half_dots", [0, 1])
def test_chunk_kda_interpreter_chunk_grad_half_dots(half_dots, monkeypatch):
    # the chunk-gradient kernel's V-loop products on the stored half tiles (fp16 here; on a GPU bf16,
    # where dW is stored in bf16 too -- here the half-store rule is widened to fp16 for dW so that every
    # operand is half): against the fp64 reference, and the half path really ran only when switched on
    use_variant(monkeypatch, "chunk_grad", half_dots=half_dots)
    monkeypatch.setattr(chunk_common, "stored_dtype", lambda what, dt: dt if what == "dw" else F32)
    ran = []
    monkeypatch.setattr(chunk_bwd, "_chunk_grad_kernel", _Watched(chunk_bwd._chunk_grad_kernel, "chunk_grad", ran))
    check_case(HALF_CASE, F16)
    assert [kw["HALF_DOTS"] for _, kw in ran] == [bool(half_dots)]


def test_stored_dtype_is_bf16_only_for_bf16_inputs_when_switched_on(monkeypatch):
    use_variant(monkeypatch, "half_store", aqk=1, dw=0)
    rule = chunk_common.stored_dtype
    assert rule("aqk", torch.bfloat16) == torch.bfloat16
    assert rule("aqk", torch.float16) == torch.float32  # fp16's range could overflow an unnormalised q.k
    assert rule("aqk", torch.float32) == torch.float32
    assert rule("dw", torch.bfloat16) == torch.float32


@pytest.mark.parametrize("precise", [0, 1, 2])
def test_chunk_kda_interpreter_half_inputs_decay_precision(precise, monkeypatch):
    # the decay products' other dot precisions for half inputs (the default, 4 = two passes with the
    # decayed operand split exactly, is the case above): 0 = one truncating tf32 pass, 1 = 3-pass,
    # 2 = one pass on operands rounded to nearest (tf32_nearest)
    use_variant(monkeypatch, "decay_grad", precise=precise)
    check_case(HALF_CASE, torch.float16)


def test_tf32_nearest_rounds_to_nearest_tf32(triton_device):
    # against an independent definition: of the two tf32 values around x (11 significant bits, from
    # frexp in fp64), the nearer one; +-Inf stay, NaN stays NaN
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1024, generator=gen) * torch.exp(8 * torch.randn(1024, generator=gen))
    x[:7] = torch.tensor([0.0, -0.0, 1.0, -2.5, float("inf"), -float("inf"), float("nan")])
    y = torch.full_like(x, 7.0, device=triton_device)
    _tf32_nearest_kernel[(1,)](x.to(triton_device), y, N=1024)
    got = y.cpu().double()
    xd = x.double()
    mant, exp = torch.frexp(xd)  # x = mant * 2^exp, 0.5 <= |mant| < 1
    lo = torch.trunc(mant * 2048) / 2048 * torch.pow(2.0, exp.double())  # toward zero
    hi = lo + torch.sign(xd) * torch.pow(2.0, exp.double() - 11)  # one tf32 step away from zero
    want = torch.where((xd - lo).abs() < (hi - xd).abs(), lo, hi)
    want[:6] = xd[:6]
    assert torch.equal(got[:6], want[:6]) and torch.isnan(got[6]), got[:7]
    assert torch.equal(got[7:], want[7:]), (got[7:] - want[7:]).abs().max()


def check_extreme(device, dtype):
    """Gates down to -1e4 per token (mixed with ordinary ones), beta exactly 0 and 1: all finite and
    equal to the reference. dg itself is ~0 where gates are huge, so its relative error is measured
    against the size of the other key-side gradient (absolute, not relative, accuracy there)."""
    T, K = 150, 32
    inp = make_inputs(1, T, 1, 2, K, K, h0=True, device=device, seed=3)
    big = torch.rand(inp["g"].shape, device=device) < 0.3
    inp["g"] = torch.where(big, torch.full_like(inp["g"], -1e4), inp["g"])
    inp["beta"] = (torch.rand(inp["beta"].shape, device=device) < 0.5).float()
    ref = run_case(inp, dtype=torch.float64, fn=chunk_kda_ref)
    out = run_case(inp, dtype=dtype, fn=chunk_kda, backend="triton")
    for name, t in out.items():
        assert torch.isfinite(t).all(), f"{name} has NaN/Inf with gates at -1e4"
    # gates at -1e4 with beta exactly 0/1 amplify rounding (measured ~5e-5 even in the interpreter's
    # true fp32): this case keeps the GPU bounds rather than a tight interpreter one with a 2x margin
    compare(out, ref, dtype, skip=("dg",), interp_tol=False)
    err = (out["dg"].double() - ref["dg"]).norm() / ref["dk"].norm()
    assert err <= tolerance("kernel_bwd", dtype), f"dg error {err:.2e} relative to |dk|"


def test_chunk_kda_interpreter_extreme_gates_and_beta():
    check_extreme("cpu", torch.float32)


# launch-table forms off the default path that treat large gates differently, each with gates at -1e4
# (the default, above, tiers the decay products' diagonal: at -1e4 every sub-chunk takes all four levels):
# the levels in every sub-chunk, the diagonal factored through one reference (spans > 60 keep the levels)
# or through the midpoint (spans > 120 keep them); the chunk-gradient kernel's V-only work inside key
# block 0's program
EXTREME_VARIANTS = {"levels_diagonal": ("decay_grad", dict(factored=0)),
                    "one_reference_diagonal": ("decay_grad", dict(factored=1)),
                    "midpoint_diagonal": ("decay_grad", dict(factored=2)),
                    "chunk_grad_v_in_block0": ("chunk_grad", dict(v_apart=0))}


@pytest.mark.parametrize("variant", list(EXTREME_VARIANTS))
def test_chunk_kda_interpreter_variant_extreme_gates(variant, monkeypatch):
    kernel, switches = EXTREME_VARIANTS[variant]
    use_variant(monkeypatch, kernel, **switches)
    check_extreme("cpu", torch.float32)


def check_graded_gates(device, dtype):
    """Gate sizes graded by sub-chunk: on a few channels, per-token gates of about -1, -6, -15, -40 and -80
    span <= 60 over 16 rows, over 8 rows only, over 4 rows only, and not even over 4 rows, so the decay
    products' diagonal takes the factored form and the halving levels in one run (session 9 also had
    tiers for 8- and 4-row groups here: a mutation of each tier failed this). Through each group's
    midpoint (spans <= 120) the tiered form (factored=3) takes the whole sub-chunk (-1, -6), 8-row groups
    (-15), 4-row groups (-40) and 2-row groups (-80) here; a mutation dropping any one tier's pairs fails
    it. The other channels keep small gates, so every form's pairs carry weight in the gradients. All
    against the fp64 reference."""
    T = 150
    inp = make_inputs(1, T, 1, 2, 32, 16, h0=True, device=device, seed=5)
    size = torch.tensor([1.0, 6.0, 15.0, 40.0, 80.0], device=device)[(torch.arange(T, device=device) // 16) % 5]
    gen = torch.Generator(device="cpu").manual_seed(6)
    u = 0.5 + 0.5 * torch.rand(inp["g"].shape, generator=gen).to(device)
    big = (torch.arange(32, device=device) % 8 == 0)  # 4 of the 32 channels
    inp["g"] = -torch.where(big, size[None, :, None, None], 0.2) * u
    ref = run_case(inp, dtype=torch.float64, fn=chunk_kda_ref)
    out = run_case(inp, dtype=dtype, fn=chunk_kda, backend="triton")
    compare(out, ref, dtype)


@pytest.mark.parametrize("factored,rolled", [(0, 0), (1, 0), (2, 0), (0, 1), (2, 1), (3, 1)])
def test_chunk_kda_interpreter_graded_gates(factored, rolled, monkeypatch):
    use_variant(monkeypatch, "decay_grad", factored=factored, rolled=rolled)
    check_graded_gates("cpu", torch.float32)


def check_no_grad_forward(device, dtype, monkeypatch, K=32, V=16, T=150, HV=2):
    """A forward no backward follows (under torch.no_grad; here with inputs that require a gradient, whose
    autograd.Function still reports needs_input_grad) gives the same o and final state, bit for bit, as
    one that keeps its intermediates, with and without ``state_fwd skip_saved`` (output inside the scan).
    With it, the forward allocates exactly the per-chunk states h [NC, HV, K, V] and W [Ttot, HV, V]
    less; the scan's store of h, were it not skipped, would land in o (its stand-in) and fail the
    comparison. Both forwards normalise q / k by a kernel of its own (bit for bit needs the same norm; the
    norm on load, which only a no-grad forward takes: :func:`check_norm_on_load`), and both cumulate the
    gates in natural units (the base-2 gates of a no-grad forward: :func:`check_base2_gates`). Returns the
    no-grad output with skip_saved."""
    use_variant(monkeypatch, "l2norm", on_load=0)
    use_variant(monkeypatch, "gate", base2=0)
    use_variant(monkeypatch, "state_fwd", output=1)
    inp = make_inputs(1, T, 1, HV, K, V, h0=True, fuse=True, device=device, seed=7)
    fusion = KDAFusion(qk_l2norm=True, beta_sigmoid=True, A_log=inp["A_log"], dt_bias=inp["dt_bias"])
    args = [inp[n].to(dtype) for n in ("q", "k", "v", "g", "beta")]
    kw = dict(initial_state=inp["h0"], output_final_state=True, fusion=fusion, backend="triton")
    with_grad = chunk_kda(*[a.clone().requires_grad_() for a in args], **kw)
    seen = {0: Counter(), 1: Counter()}
    for skip in (0, 1):
        use_variant(monkeypatch, "state_fwd", skip_saved=skip)
        count_allocations(monkeypatch, seen[skip])
        with torch.no_grad():
            no_grad = chunk_kda(*[a.clone().requires_grad_() for a in args], **kw)
        for a, b in zip(no_grad, with_grad):
            assert torch.equal(a, b.detach())
    assert seen[1] - seen[0] == Counter()
    assert seen[0] - seen[1] == Counter({((-(-T // 64), HV, K, V), dtype): 1, ((T, HV, V), dtype): 1})
    return no_grad


def test_chunk_kda_interpreter_no_grad_forward(monkeypatch):
    check_no_grad_forward("cpu", torch.float32, monkeypatch)


def fused_forward_case(case, dtype, device):
    """A CPU_CASES-style ``case`` with the layer's fused options: the fp64 reference's outputs, the
    inputs in ``dtype`` and chunk_kda's keywords (initial state, final state, packed offsets, fusion)."""
    B, T, H, HV, K, V, offsets, h0, _ = case
    cu = torch.tensor(offsets, dtype=torch.int32, device=device) if offsets else None
    inp = make_inputs(B, T, H, HV, K, V, N=len(offsets) - 1 if offsets else None, fuse=True, h0=h0, device=device)
    ref = run_case(inp, dtype=torch.float64, fn=chunk_kda_ref, cu_seqlens=cu, fuse=True)
    fusion = KDAFusion(qk_l2norm=True, beta_sigmoid=True, A_log=inp["A_log"], dt_bias=inp["dt_bias"])
    args = [inp[n].to(dtype) for n in ("q", "k", "v", "g", "beta")]
    kw = dict(initial_state=inp["h0"], output_final_state=True, cu_seqlens=cu, fusion=fusion, backend="triton")
    return ref, args, kw


def check_norm_on_load(case, dtype, monkeypatch, device="cpu", merge=0):
    """A no-grad layer-fused forward normalises q / k on load (launch table l2norm on_load): the rstd
    kernel runs (``merge``: in one launch with the gate's cumsum, gate merge_rstd), no normalised copy is
    made, the three readers of q / k get NORM; o and the final state match the fp64 reference, and a
    forward that keeps intermediates still makes the copies."""
    from kimi_linear.ops.kda import chunk_fwd

    ref, args, kw = fused_forward_case(case, dtype, device)
    names = ("_rstd_kernel", "_rstd_prologue_kernel", "_gate_cumsum_kernel", "_l2norm_fwd_kernel", "_prologue_kernel",
             "_gram_solve_kernel", "_gram_diag_kernel", "_wu_kernel")
    ran = watch_launches(monkeypatch, chunk_fwd, names)
    use_variant(monkeypatch, "l2norm", on_load=1)
    use_variant(monkeypatch, "gate", merge_rstd=merge)
    with torch.no_grad():
        o, ht = chunk_kda(*args, **kw)
    compare({"o": o, "ht": ht}, {"o": ref["o"], "ht": ref["ht"]}, dtype)
    prologue = {"_rstd_prologue_kernel"} if merge else {"_rstd_kernel", "_gate_cumsum_kernel"}
    assert {name for name, _ in ran} == prologue | {"_gram_solve_kernel", "_gram_diag_kernel", "_wu_kernel"}
    assert all(kw["NORM"] for name, kw in ran if name not in prologue)
    ran.clear()
    chunk_kda(*[a.clone().requires_grad_() for a in args], **kw)  # (a backward may follow: the copies)
    assert "_l2norm_fwd_kernel" in {name for name, _ in ran} and not any(kw.get("NORM") for _, kw in ran)


def check_gram_solve_no_grad(case, dtype, monkeypatch, device="cpu"):
    """The fused off-diagonal gram + inverse (launch table gram_solve on) in a no-grad layer-fused forward,
    where it keeps Araw's off-diagonal blocks in registers only (STORE_ARAW off; every buffer poisoned with
    NaN first, so a read of an unstored block shows): o and the final state match the fp64 reference and the
    two-launch form, and neither _gram_kernel nor _inverse_kernel runs."""
    from kimi_linear.ops.kda import chunk_fwd

    ref, args, kw = fused_forward_case(case, dtype, device)
    monkeypatch.setattr(chunk_common, "POISON", True)
    ran = watch_launches(monkeypatch, chunk_fwd, ("_gram_kernel", "_inverse_kernel", "_gram_solve_kernel"))
    out = {}
    for on in (0, 1):
        use_variant(monkeypatch, "gram_solve", on=on)
        ran.clear()
        with torch.no_grad():
            out[on] = chunk_kda(*args, **kw)
        names = {name for name, _ in ran}
        assert names == ({"_gram_solve_kernel"} if on else {"_gram_kernel", "_inverse_kernel"}), names
    assert not any(kw["STORE_ARAW"] for name, kw in ran)
    compare({"o": out[1][0], "ht": out[1][1]}, {"o": ref["o"], "ht": ref["ht"]}, dtype)
    compare({"o": out[1][0], "ht": out[1][1]}, {"o": out[0][0].double(), "ht": out[0][1].double()}, dtype)


@pytest.mark.parametrize("case", (CPU_CASES[1], CPU_CASES[-1]), ids=("odd", "packed"))
def test_chunk_kda_interpreter_gram_solve_no_grad(case, monkeypatch):
    check_gram_solve_no_grad(case, torch.float32, monkeypatch)


def check_base2_gates(case, dtype, monkeypatch, device="cpu"):
    """A no-grad forward cumulates the gates in units of log2 (launch table gate base2): the gate's cumsum
    and the four readers of G (grams, products, scan) get BASE2 and take 2^x of its differences. o and
    the final state match the fp64 reference and the natural-unit forward (to rounding: not bit for bit,
    exp2 of a scaled difference rounds differently); a forward a backward may follow keeps G natural."""
    from kimi_linear.ops.kda import chunk_fwd

    ref, args, kw = fused_forward_case(case, dtype, device)
    readers = ("_gram_solve_kernel", "_gram_diag_kernel", "_wu_kernel", "_state_fwd_kernel")
    names = ("_rstd_prologue_kernel", "_gate_cumsum_kernel", "_prologue_kernel") + readers
    ran = watch_launches(monkeypatch, chunk_fwd, names)
    out = {}
    for base2 in (1, 0):
        use_variant(monkeypatch, "gate", base2=base2)
        ran.clear()
        with torch.no_grad():
            out[base2] = chunk_kda(*args, **kw)
        assert {name for name, _ in ran} >= set(readers)
        assert all(kw["BASE2"] == bool(base2) for _, kw in ran), ran
    compare({"o": out[1][0], "ht": out[1][1]}, {"o": ref["o"], "ht": ref["ht"]}, dtype)
    compare({"o": out[1][0], "ht": out[1][1]}, {"o": out[0][0].double(), "ht": out[0][1].double()}, dtype)
    use_variant(monkeypatch, "gate", base2=1)
    ran.clear()
    chunk_kda(*[a.clone().requires_grad_() for a in args], **kw)  # (a backward may follow: natural units)
    assert ran and not any(kw["BASE2"] for _, kw in ran)


def check_full_chunks(device, dtype, monkeypatch, K=32, V=16):
    """Where every sequence's length is a multiple of 64 (``ChunkTable.full``) the per-chunk kernels place
    their chunks from their index (launch table chunks full: the forward's; chunks bwd: the backward's):
    they get FULL exactly then, and the forward and its gradients are bit for bit those of the
    table-reading launches; a stream with a part chunk keeps reading the table."""
    from kimi_linear.ops.kda import chunk_bwd, chunk_fwd

    fwd = ("_rstd_prologue_kernel", "_gate_cumsum_kernel", "_prologue_kernel", "_gram_solve_kernel",
           "_gram_diag_kernel", "_wu_kernel", "_output_kernel")
    bwd = ("_dw_local_kernel", "_chunk_grad_kernel", "_chunk_grad_finish_kernel", "_decay_grad_kernel",
           "_gate_grad_kernel", "_epilogue_kernel")
    ran = watch_launches(monkeypatch, chunk_fwd, fwd)
    watch_launches(monkeypatch, chunk_bwd, bwd, ran)
    use_variant(monkeypatch, "state_fwd", output=0)  # (the output kernel runs too)
    use_variant(monkeypatch, "state_bwd", dw_local=1)  # (and the backward's dW-local kernel)
    for offsets, full in (([0, 64, 192], True), ([0, 64, 150], False)):
        cu = torch.tensor(offsets, dtype=torch.int32, device=device)
        inp = make_inputs(1, offsets[-1], 1, 2, K, V, N=len(offsets) - 1, fuse=True, h0=True, device=device)
        out = {}
        for flags in ((1, 1), (1, 0), (0, 0)):
            use_variant(monkeypatch, "chunks", full=flags[0], bwd=flags[1])
            ran.clear()
            out[flags] = run_case(inp, dtype=dtype, fn=chunk_kda, cu_seqlens=cu, fuse=True, backend="triton")
            assert {n for n, _ in ran} >= {"_gram_solve_kernel", "_gram_diag_kernel", "_wu_kernel",
                                          "_output_kernel", "_dw_local_kernel", "_chunk_grad_kernel",
                                          "_chunk_grad_finish_kernel", "_decay_grad_kernel"}
            for name, kw in ran:
                assert kw["FULL"] == (full and bool(flags[name in bwd])), (name, flags)
        for flags in ((1, 1), (1, 0)):
            for name in out[flags]:
                assert torch.equal(out[flags][name], out[(0, 0)][name]), (flags, name)


def test_chunk_kda_interpreter_full_chunks(monkeypatch):
    check_full_chunks("cpu", torch.float32, monkeypatch)


@pytest.mark.parametrize("case", [CPU_CASES[-2], CPU_CASES[-1]], ids=["gva-varlen-h0", "varlen"])
def test_chunk_kda_interpreter_base2_gates(case, monkeypatch):
    check_base2_gates(case, torch.float32, monkeypatch)


@pytest.mark.parametrize("merge", [0, 1], ids=["rstd-apart", "rstd-with-gate"])
@pytest.mark.parametrize("case", [CPU_CASES[-2], CPU_CASES[-1]], ids=["gva-varlen-h0", "varlen"])
def test_chunk_kda_interpreter_norm_on_load(case, merge, monkeypatch):
    # GVA (two value heads per q/k head: one rstd per q/k head), sequences ending mid-sub-chunk and
    # an empty one, an initial state; the rstd apart or in one launch with the gate's cumsum
    check_norm_on_load(case, torch.float32, monkeypatch, merge=merge)


def test_chunk_kda_interpreter_empty_and_causal():
    # T == 0: no tokens; the final state is the initial state and its gradient passes straight through.
    inp = make_inputs(2, 0, 1, 1, 16, 16, h0=True)
    out = run_case(inp, dtype=torch.float32, fn=chunk_kda, backend="triton")
    assert out["o"].shape == (2, 0, 1, 16)
    torch.testing.assert_close(out["ht"], inp["h0"])
    torch.testing.assert_close(out["dh0"], inp["dht"])
    # Causality: changing tokens after t0 leaves outputs before t0 bit-identical.
    inp = make_inputs(1, 80, 1, 1, 16, 16)
    t0 = 37
    o1, _ = chunk_kda(inp["q"], inp["k"], inp["v"], inp["g"], inp["beta"], backend="triton")
    for name in ("q", "k", "v", "g", "beta"):
        inp[name][:, t0:] = inp[name][:, t0:].flip(1) * 0.5 if name != "g" else inp[name][:, t0:] * 3
    o2, _ = chunk_kda(inp["q"], inp["k"], inp["v"], inp["g"], inp["beta"], backend="triton")
    assert torch.equal(o1[:, :t0], o2[:, :t0])
    assert not torch.equal(o1[:, t0:], o2[:, t0:])


def test_chunk_kda_triton_rejects_unsupported():
    x = torch.randn(1, 4, 1, 16, dtype=torch.float64)
    with pytest.raises(TypeError, match="fp16/bf16/fp32"):
        chunk_kda(x, x, x, -x.abs(), x[..., 0], backend="triton")
    y = torch.randn(1, 4, 1, 256)
    with pytest.raises(ValueError, match="K <= 128"):
        chunk_kda(y, y, y, -y.abs(), y[..., 0], backend="triton")


# ------------------------------------------------------------------------------------------------
# GPU: full sizes
# ------------------------------------------------------------------------------------------------

GPU_DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def check_fused_varlen(device, dtype, H=4, HV=8):
    """Odd lengths, an empty sequence, GVA (unless H == HV), initial states, the layer's fused
    gate/norm/beta, K=V=128."""
    offsets = [0, 1000, 1000, 4133, 4200]
    cu = torch.tensor(offsets, dtype=torch.int32, device=device)
    inp = make_inputs(1, offsets[-1], H, HV, 128, 128, N=len(offsets) - 1, fuse=True, h0=True, device=device)
    ref = run_case(inp, dtype=torch.float64, fn=chunk_kda_ref, cu_seqlens=cu, fuse=True)
    out = run_case(inp, dtype=dtype, fn=chunk_kda, cu_seqlens=cu, fuse=True, backend="triton")
    compare(out, ref, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
def test_chunk_kda_gpu_fused_varlen(cuda_device, dtype):
    check_fused_varlen(cuda_device, dtype)


@pytest.mark.gpu
# (the fp32 reference keeps [HV, 64, 64, K] decay tensors per chunk for autograd: sizes fit 80 GB)
@pytest.mark.parametrize("shape", [(1, 65536, 2, 2), (16, 512, 16, 16)], ids=["T65536", "BH256"])
def test_chunk_kda_gpu_full_size(cuda_device, shape):
    B, T, H, HV = shape
    inp = make_inputs(B, T, H, HV, 128, 128, h0=True, device=cuda_device)
    ref = run_case(inp, dtype=torch.float32, fn=chunk_kda_ref)  # fp32 reference at this size
    out = run_case(inp, dtype=torch.bfloat16, fn=chunk_kda, backend="triton")
    compare(out, ref, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
def test_chunk_kda_gpu_extreme(cuda_device, dtype):
    check_extreme(cuda_device, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("tiles", [(32, 32, 1, 1), (64, 16, 1, 1), (64, 32, 1, 1), (64, 32, 0, 0), (None, None, 1, 0)],
                         ids=["BK32-BV32", "BK64-BV16", "BK64-BV32", "BK64-BV32-v_in_block0", "tf32_dots"])
def test_chunk_kda_gpu_chunk_grad_tiles(cuda_device, tiles, monkeypatch):
    # (tf32_dots: the V loop's products on widened fp32 copies, as before half_dots; also with gates at -1e4)
    use_variant(monkeypatch, "chunk_grad", BK=tiles[0], BV=tiles[1], v_apart=tiles[2], half_dots=tiles[3])
    check_fused_varlen(cuda_device, torch.bfloat16)
    if not tiles[3]:
        check_extreme(cuda_device, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_chunk_kda_gpu_l2norm_merged_launches(cuda_device, dtype, monkeypatch):
    # the gate's cumsum and the q/k norm in one launch, their backwards in separate launches: the two
    # forms the default (separate forward launches, merged backward without GVA) leaves out, K = V = 128
    use_variant(monkeypatch, "gate", merge_l2norm=1)
    use_variant(monkeypatch, "gate_grad", merge_l2norm=0)
    check_fused_varlen(cuda_device, dtype, H=8, HV=8)
    check_fused_varlen(cuda_device, dtype)  # GVA: the forward merge only


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_chunk_kda_gpu_fp32_dy_ahead_of_l2norm(cuda_device, dtype, monkeypatch):
    # dq / dk in fp32 ahead of the fused l2norm backward (launch table l2norm half_dy=0; the default
    # hands over the input dtype without GVA, whose group sum keeps fp32)
    use_variant(monkeypatch, "l2norm", half_dy=0)
    check_fused_varlen(cuda_device, dtype, H=8, HV=8)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_chunk_kda_gpu_state_bwd_dw_local(cuda_device, dtype, monkeypatch):
    # the scan's dO-only term as its own parallel kernel first (the default keeps it in the scan)
    use_variant(monkeypatch, "state_bwd", dw_local=1)
    check_fused_varlen(cuda_device, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_chunk_kda_gpu_no_grad_forward(cuda_device, dtype, monkeypatch):
    # the inference forward at K = V = 128 with the scan's saved stores skipped, against the fp64 reference
    # and bit for bit against the forward that keeps them
    o, ht = check_no_grad_forward(cuda_device, dtype, monkeypatch, K=128, V=128, T=300, HV=4)
    inp = make_inputs(1, 300, 1, 4, 128, 128, h0=True, fuse=True, device=cuda_device, seed=7)
    fusion = KDAFusion(qk_l2norm=True, beta_sigmoid=True, A_log=inp["A_log"].double(), dt_bias=inp["dt_bias"].double())
    ref_o, ref_ht = chunk_kda_ref(*[inp[n].double() for n in ("q", "k", "v", "g", "beta")],
                                  initial_state=inp["h0"].double(), output_final_state=True, fusion=fusion)
    assert rel_rms(o, ref_o) <= tolerance("kernel_fwd", dtype)
    assert rel_rms(ht, ref_ht) <= tolerance("kernel_fwd", dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_chunk_kda_interpreter_norm_on_load_extreme(dtype, monkeypatch):
    # the norm on load with q / k rows of zero (rstd 1e3), of 1e-3 and of 1e2 in size, and raw gate
    # logits of 1e4 (the gate at its floor) on 30% of positions: finite, and equal to the fp64
    # reference (fp16: half operands on the interpreter, as bf16 is GPU-only here)
    use_variant(monkeypatch, "l2norm", on_load=1)
    T, H, HV, K = 150, 1, 2, 32
    inp = make_inputs(1, T, H, HV, K, K, fuse=True, h0=True, seed=5)
    scale = torch.ones(1, T, H, 1)
    scale[:, 3::7], scale[:, 5::11], scale[:, 8::13] = 0.0, 1e-3, 1e2
    inp["q"], inp["k"] = inp["q"] * scale, inp["k"] * scale.roll(1, dims=1)
    inp["g"] = torch.where(torch.rand(inp["g"].shape, generator=torch.Generator().manual_seed(6)) < 0.3,
                           torch.full_like(inp["g"], 1e4), inp["g"])
    ref = run_case(inp, dtype=torch.float64, fn=chunk_kda_ref, fuse=True)
    fusion = KDAFusion(qk_l2norm=True, beta_sigmoid=True, A_log=inp["A_log"], dt_bias=inp["dt_bias"])
    with torch.no_grad():
        o, ht = chunk_kda(*[inp[n].to(dtype) for n in ("q", "k", "v", "g", "beta")], initial_state=inp["h0"],
                          output_final_state=True, fusion=fusion, backend="triton")
    assert torch.isfinite(o).all() and torch.isfinite(ht).all()
    compare({"o": o, "ht": ht}, {"o": ref["o"], "ht": ref["ht"]}, dtype, interp_tol=False)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_chunk_kda_gpu_full_chunks(cuda_device, dtype, monkeypatch):
    check_full_chunks(cuda_device, dtype, monkeypatch, K=128, V=128)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_chunk_kda_gpu_base2_gates(cuda_device, dtype, monkeypatch):
    # the no-grad forward's base-2 gates at K = V = 128: GVA with varlen and an initial state, and H = HV = 8
    check_base2_gates((1, 300, 2, 4, 128, 128, [0, 0, 1, 77, 300], True, True), dtype, monkeypatch, cuda_device)
    check_base2_gates((2, 200, 8, 8, 128, 128, None, False, True), dtype, monkeypatch, cuda_device)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_chunk_kda_gpu_norm_on_load(cuda_device, dtype, monkeypatch):
    # the inference forward's q/k norm on load at K = V = 128: GVA with varlen, and H = HV = 8; the rstd
    # apart and in one launch with the gate's cumsum
    for merge in (0, 1):
        check_norm_on_load((1, 300, 2, 4, 128, 128, [0, 0, 1, 77, 300], True, True), dtype, monkeypatch, cuda_device,
                           merge)
        check_norm_on_load((2, 200, 8, 8, 128, 128, None, False, True), dtype, monkeypatch, cuda_device, merge)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_chunk_kda_gpu_output_in_scan(cuda_device, dtype, monkeypatch):
    # the output inside the forward scan, forced (by default it runs where the scan has many programs),
    # against the fp64 reference and against the separate output kernel: the same operands, so they differ
    # only where another fp32 summation order moves a half-precision rounding (measured on an H100:
    # 9.9e-6 bf16, 4.4e-6 fp16; with W not rounded as stored it was 2.5e-3)
    inp = make_inputs(2, 1000, 2, 4, 128, 128, h0=True, device=cuda_device)
    cast = [inp[n].to(dtype) for n in ("q", "k", "v", "g", "beta")]
    outs = []
    for fused in (0, 1):
        use_variant(monkeypatch, "state_fwd", output=fused)
        outs.append(chunk_kda(*cast, initial_state=inp["h0"], backend="triton")[0].float())
    assert rel_rms(outs[1], outs[0]) <= 1e-4
    check_fused_varlen(cuda_device, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("variant", list(EXTREME_VARIANTS))
def test_chunk_kda_gpu_variant_fused_and_extreme(cuda_device, variant, dtype, monkeypatch):
    # EXTREME_VARIANTS at K = V = 128 on the fused varlen case and with gates at -1e4
    kernel, switches = EXTREME_VARIANTS[variant]
    use_variant(monkeypatch, kernel, **switches)
    check_fused_varlen(cuda_device, dtype)
    check_extreme(cuda_device, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("factored,rolled", [(0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (2, 1), (3, 1)])
def test_chunk_kda_gpu_graded_gates(cuda_device, factored, rolled, monkeypatch):
    use_variant(monkeypatch, "decay_grad", factored=factored, rolled=rolled)
    check_graded_gates(cuda_device, torch.float32)
    check_fused_varlen(cuda_device, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("case", [c for c in HALF_STORE_CASES if c != "dqk-gva"])  # (the GPU case has GVA)
def test_chunk_kda_gpu_half_stored_intermediates(cuda_device, case, monkeypatch):
    # Aqk / dW / the dq-dk parts in bf16 at K = V = 128: the fused varlen case, gates at -1e4, and the
    # inference forward (the output inside the scan reads the bf16 Aqk) bit for bit against the keeping one
    half, extra = HALF_STORE_CASES[case]
    if extra:
        use_variant(monkeypatch, "state_bwd", **extra)
    # each case with its own switch alone (every key named: a case must not inherit another's default)
    use_variant(monkeypatch, "half_store", **{w: int(w in half) for w in chunk_common.LAUNCH["half_store"]})
    check_fused_varlen(cuda_device, torch.bfloat16)
    check_extreme(cuda_device, torch.bfloat16)
    check_no_grad_forward(cuda_device, torch.bfloat16, monkeypatch, K=128, V=128, T=300, HV=4)


@pytest.mark.gpu
@pytest.mark.parametrize("precise", [0, 1, 2])
def test_chunk_kda_gpu_decay_precision(cuda_device, precise, monkeypatch):
    # the decay products' other dot precisions in bf16 (default 4 = split two-pass): truncating and
    # rounded single-pass tf32 and 3-pass must all stay inside the GPU tolerances
    use_variant(monkeypatch, "decay_grad", precise=precise)
    check_fused_varlen(cuda_device, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("heads", [1, 4])
def test_chunk_kda_gpu_gram_diag_heads_per_program(cuda_device, heads, monkeypatch):
    use_variant(monkeypatch, "gram_diag", BH=heads, num_warps=1)
    check_fused_varlen(cuda_device, torch.bfloat16)


@pytest.mark.gpu
def test_chunk_kda_gpu_pack_equals_alone_and_causal(cuda_device):
    lens = [300, 1, 0, 4097, 64]
    offsets = [0]
    for n in lens:
        offsets.append(offsets[-1] + n)
    cu = torch.tensor(offsets, dtype=torch.int32, device=cuda_device)
    inp = make_inputs(1, offsets[-1], 2, 4, 128, 128, N=len(lens), h0=True, device=cuda_device)
    cast = {n: inp[n].to(torch.bfloat16) for n in ("q", "k", "v", "g", "beta")}
    o, ht = chunk_kda(*cast.values(), initial_state=inp["h0"], output_final_state=True, cu_seqlens=cu,
                      backend="triton")
    for i, (s, e) in enumerate(zip(offsets[:-1], offsets[1:])):
        alone = [t[:, s:e] for t in cast.values()]
        o1, h1 = chunk_kda(*alone, initial_state=inp["h0"][i:i + 1], output_final_state=True, backend="triton")
        if e > s:
            assert rel_rms(o[:, s:e], o1) <= 1e-6
        assert rel_rms(ht[i:i + 1], h1) <= 1e-6
    t0 = 3000
    o2, _ = chunk_kda(*[torch.cat([t[:, :t0], t[:, t0:].flip(1)], 1) for t in cast.values()], initial_state=inp["h0"],
                      cu_seqlens=cu, backend="triton")
    assert torch.equal(o[:, :t0], o2[:, :t0])


@pytest.mark.gpu
@pytest.mark.parametrize("K,V,T", [(8, 8, 40), (16, 16, 40), (16, 32, 100), (32, 32, 40), (32, 64, 200), (64, 64, 333)])
def test_chunk_kda_gpu_small_head_dims(cuda_device, K, V, T):
    # the layer's fused path at head dims below 128 (K = V = 16 and 8 once faulted in the backward's
    # state pass with 8 warps on 16-wide tiles; small tiles now launch with at most 4 warps)
    inp = make_inputs(2, T, 2, 2, K, V, fuse=True, h0=True, device=cuda_device)
    ref = run_case(inp, dtype=torch.float64, fn=chunk_kda_ref, fuse=True)
    out = run_case(inp, dtype=torch.float32, fn=chunk_kda, fuse=True, backend="triton")
    torch.cuda.synchronize()
    compare(out, ref, torch.float32)


def test_chunk_kda_interpreter_after_same_dtype_reference():
    # the GPU full-size tests run an fp32 reference on fp32 inputs before the kernel; the kernel's
    # gradients must still all come back (they once did not, through the test's own casts)
    inp = make_inputs(2, 40, 2, 2, 32, 32, h0=True)
    ref = run_case(inp, dtype=torch.float32, fn=chunk_kda_ref)
    out = run_case(inp, dtype=torch.float16, fn=chunk_kda, backend="triton")
    compare(out, ref, torch.float16)
