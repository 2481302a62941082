"""L2 prefetch from a decode kernel's extra programs (:mod:`kimi_linear.ops.prefetch`).

The plan (how many programs, when it is off) is tested on the CPU; that the kernels compile the
prefetch for Hopper, in their extra programs only, is tested by compiling them for sm_90a without a GPU
(in a child process: the CPU tests run Triton's interpreter, which cannot compile); that results are
bit-identical with and without it, on a GPU (the decode step's generation tests also run with it on)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from kimi_linear.ops import prefetch


@pytest.fixture
def hopper(monkeypatch):
    """Pretend the (CPU) device is a Hopper GPU outside the interpreter, to test the plan's arithmetic."""
    monkeypatch.setattr(prefetch, "hopper_or_later", lambda device: True)
    monkeypatch.setattr(prefetch, "triton_interpret", lambda: False)


def test_plan_is_off_on_cpu_and_without_a_tensor():
    w = torch.empty(4096, dtype=torch.bfloat16)
    assert prefetch.prefetch_plan(w, w.device, 128) == (None, 0, 0)
    assert prefetch.prefetch_plan(None, torch.device("cpu"), 128) == (None, 0, 0)


@pytest.mark.parametrize("numel,lanes,per_row", [(2304 * 4096, 128, 2), (2304 * 4096, 128, 1), (8, 32, 1),
                                                 (16384 * 128 // 2 + 8, 128, 1), (1 << 20, 64, 3)])
def test_plan_covers_the_tensor_with_whole_rows(hopper, numel, lanes, per_row):
    w = torch.empty(numel, dtype=torch.bfloat16)
    t, nbytes, rows = prefetch.prefetch_plan(w, w.device, lanes, per_row)
    assert t is w and nbytes == 2 * numel
    per_program = prefetch.CHUNK * lanes
    assert rows * per_row * per_program >= nbytes  # every byte has a program
    assert (rows - 1) * per_row * per_program < nbytes  # and no whole row is idle


def test_plan_refuses_what_the_instruction_cannot_take(hopper, monkeypatch):
    buf = torch.empty(4096 + 16, dtype=torch.uint8)
    assert buf.data_ptr() % 16 == 0
    assert prefetch.prefetch_plan(buf[1:4097], buf.device, 128)[2] == 0  # address not 16-byte aligned
    assert prefetch.prefetch_plan(buf[:1000], buf.device, 128)[2] == 0  # size not a multiple of 16
    assert prefetch.prefetch_plan(buf[:0], buf.device, 128)[2] == 0  # nothing to prefetch
    assert prefetch.prefetch_plan(torch.empty(64, 64)[:, :32], buf.device, 128)[2] == 0  # not contiguous
    assert prefetch.prefetch_plan(buf[:4096], buf.device, 128)[2] == 1
    monkeypatch.setattr(prefetch, "ENABLED", False)
    assert prefetch.prefetch_plan(buf[:4096], buf.device, 128)[2] == 0


_COMPILE = textwrap.dedent('''
    import json
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from kimi_linear.ops.kda.recurrent_kernel import _recurrent_kda_fwd_kernel
    from kimi_linear.ops.norm_kernel import _rms_norm_store_kernel

    def ptx(fn, const, types):
        sig = {n: "constexpr" if n in const else types.get(n, "*bf16") for n in fn.arg_names}
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const), target=GPUTarget("cuda", 90, 32),
                           options=dict(num_warps=4, launch_pdl=True))
        return k.asm["ptx"]

    def where(text):
        lines = text.splitlines()
        return dict(prefetch=sum("cp.async.bulk.prefetch.L2.global" in x for x in lines),
                    wait=sum("griddepcontrol.wait" in x for x in lines))

    out = {}
    rec = dict(H=2, HV=2, K=64, V=64, BK=64, BV=32, IS_VARLEN=False, USE_INDICES=True, HAS_INIT=True, STORE_FINAL=True,
               QK_L2NORM=True, GATE_FROM_RAW=True, BETA_SIGMOID=True, PDL=True, TRIGGER=True, PF_CHUNK=16384, PF_LANES=128)
    rec_types = dict(h0="*fp32", ht="*fp32", cu_seqlens="*i32", state_indices="*i64", A_log="*fp32", dt_bias="*fp32",
                     pf_bytes="i64", scale="fp32", T="i32", P="i32")
    for rows in (0, 2):
        out[f"recurrent_{rows}"] = where(ptx(_recurrent_kda_fwd_kernel, dict(rec, PF_ROWS=rows), rec_types))
    st = dict(D=512, DP=512, E=64, EP=64, COPY=True, PDL=True, TRIGGER=True, PF_CHUNK=16384, PF_LANES=128)
    st_types = dict(start="*i64", pf_bytes="i64", eps="fp32", stride_x="i32", stride_src="i32", L="i32")
    for n in (0, 3):
        out[f"store_{n}"] = where(ptx(_rms_norm_store_kernel, dict(st, PF_PROGRAMS=n), st_types))
    print(json.dumps(out))
''')


def test_kernels_compile_the_prefetch_for_hopper_only_when_asked():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([os.getcwd(), env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, "-c", _COMPILE], capture_output=True, text=True, env=env, timeout=600)
    if run.returncode != 0 and "GPUTarget" in run.stderr and "ImportError" in run.stderr:
        pytest.skip("this Triton cannot compile for CUDA without a GPU")
    assert run.returncode == 0, run.stderr[-3000:]
    import json

    got = json.loads(run.stdout.strip().splitlines()[-1])
    for name in ("recurrent", "store"):
        off, on = got[f"{name}_0"], got[f"{name}_{2 if name == 'recurrent' else 3}"]
        assert off == dict(prefetch=0, wait=1), (name, off)
        assert on["prefetch"] >= 1 and on["wait"] == 1, (name, on)


def _cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    return torch.device("cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("weight_numel", [2304 * 4096, 4096 + 8])
def test_recurrent_kda_bit_identical_with_prefetch(weight_numel):
    from kimi_linear.ops.kda.fusion import KDAFusion
    from kimi_linear.ops.kda.recurrent import recurrent_kda

    dev = _cuda()
    torch.manual_seed(0)
    B, H, K, V, P = 3, 8, 128, 128, 5
    q, k = (torch.randn(B, 1, H, K, device=dev, dtype=torch.bfloat16) for _ in range(2))
    v = torch.randn(B, 1, H, V, device=dev, dtype=torch.bfloat16)
    g = torch.randn(B, 1, H, K, device=dev, dtype=torch.bfloat16)
    beta = torch.randn(B, 1, H, device=dev, dtype=torch.bfloat16)
    fusion = KDAFusion(qk_l2norm=True, beta_sigmoid=True, A_log=torch.randn(H, device=dev),
                       dt_bias=torch.randn(H * K, device=dev))
    pool = torch.randn(P, H, K, V, device=dev)
    idx = torch.tensor([4, 0, 2], device=dev)
    w = torch.randn(weight_numel, device=dev, dtype=torch.bfloat16)
    w_before = w.clone()
    results = []
    for pf in (None, w):
        state = pool.clone()
        o, _ = recurrent_kda(q, k, v, g, beta, initial_state=state, state_indices=idx, fusion=fusion,
                             backend="triton", l2_prefetch=pf)
        results.append((o, state))
    torch.cuda.synchronize()
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])
    assert torch.equal(w, w_before)


@pytest.mark.gpu
def test_rms_norm_store_bit_identical_with_prefetch():
    from kimi_linear.ops.norm import rms_norm_store_

    dev = _cuda()
    torch.manual_seed(1)
    B, L, D, E = 3, 40, 512, 64
    x = torch.randn(B, D + E, device=dev, dtype=torch.bfloat16)
    weight = torch.randn(D, device=dev, dtype=torch.bfloat16)
    start = torch.tensor([0, 17, 39], device=dev)
    w = torch.randn(2304 * 4096, device=dev, dtype=torch.bfloat16)
    outs = []
    for pf in (None, w):
        out = torch.full((B, L, D), float("nan"), device=dev, dtype=torch.bfloat16)
        dst = torch.full((B, L, E), float("nan"), device=dev, dtype=torch.bfloat16)
        rms_norm_store_(x[:, :D], weight, 1e-6, out, start, copy=(x[:, D:], dst), backend="triton", l2_prefetch=pf)
        outs.append((out, dst))
    torch.cuda.synchronize()
    assert torch.equal(outs[0][0].nan_to_num(7.0), outs[1][0].nan_to_num(7.0))
    assert torch.equal(outs[0][1].nan_to_num(7.0), outs[1][1].nan_to_num(7.0))
    assert not outs[1][0][2, 39].isnan().any()  # the rows were written
