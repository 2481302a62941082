"""L2 prefetch on a side stream (:mod:`kimi_linear.ops.prefetch`).

The plan (how many programs, when it is off) is tested on the CPU; that the kernel compiles the bulk
prefetch for Hopper is tested by compiling it for sm_90a without a GPU (in a child process: the CPU tests
run Triton's interpreter, which cannot compile); on a GPU, that a fork and its join work eager and inside a
CUDA-graph capture and that decode results are bit-identical with it on and off
(tests/generation/test_gpu_generation.py)."""

from __future__ import annotations

import json
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


def test_off_on_cpu_and_without_a_tensor():
    w = torch.empty(4096, dtype=torch.bfloat16)
    assert prefetch.prefetch_plan(w) == (0, 0)
    assert prefetch.prefetch_plan(None) == (0, 0)
    assert prefetch.prefetch_l2_(w) is False and prefetch.prefetch_l2_(None) is False
    assert not prefetch._pending
    prefetch.join_prefetches()  # nothing forked: a no-op
    with pytest.raises(TypeError, match="takes a tensor.*got list"):
        prefetch.prefetch_l2_([w])


@pytest.mark.parametrize("numel", [2304 * 4096, 8, 16384 // 2 * 3 + 8])
def test_plan_programs(hopper, numel):
    w = torch.empty(numel, dtype=torch.bfloat16)
    nbytes, programs = prefetch.prefetch_plan(w)
    assert nbytes == 2 * numel
    pieces = -(-nbytes // prefetch.CHUNK)
    assert programs == min(prefetch.PROGRAMS, pieces)  # never a program without a piece


def test_plan_refuses_what_the_instruction_cannot_take(hopper, monkeypatch):
    buf = torch.empty(4096 + 16, dtype=torch.uint8)
    assert buf.data_ptr() % 16 == 0
    assert prefetch.prefetch_plan(buf[1:4097])[1] == 0  # address not 16-byte aligned
    assert prefetch.prefetch_plan(buf[:1000])[1] == 0  # size not a multiple of 16
    assert prefetch.prefetch_plan(buf[:0])[1] == 0  # nothing to prefetch
    assert prefetch.prefetch_plan(torch.empty(64, 64)[:, :32])[1] == 0  # not contiguous
    assert prefetch.prefetch_plan(buf[:4096]) == (4096, 1)
    monkeypatch.setattr(prefetch, "ENABLED", False)
    assert prefetch.prefetch_plan(buf[:4096])[1] == 0


_COMPILE = textwrap.dedent('''
    import json
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from kimi_linear.ops.prefetch_kernel import LANES, _prefetch_l2_kernel as fn

    sig = dict(base="*bf16", nbytes="i64", CHUNK="constexpr", LANES="constexpr")
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=dict(CHUNK=16384, LANES=LANES)),
                       target=GPUTarget("cuda", 90, 32), options=dict(num_warps=LANES // 32))
    ptx = k.asm["ptx"]
    print(json.dumps(dict(prefetch=ptx.count("cp.async.bulk.prefetch.L2.global"),
                          stores=ptx.count("st.global"), cubin=len(k.asm.get("cubin", b"")))))
''')


def test_kernel_compiles_the_bulk_prefetch_for_hopper():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([os.getcwd(), env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, "-c", _COMPILE], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["prefetch"] >= 1 and got["stores"] == 0 and got["cubin"] > 0, got


def _hopper():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    dev = torch.device("cuda", torch.cuda.current_device())
    if prefetch.prefetch_plan(torch.empty(16, dtype=torch.uint8, device=dev))[1] == 0:
        pytest.skip("the bulk L2 prefetch needs compute capability >= 9")
    return dev


@pytest.mark.gpu
def test_fork_and_join_eager_and_in_a_graph():
    dev = _hopper()
    w = torch.randn(2304 * 4096 + 8, device=dev, dtype=torch.bfloat16)
    before = w.clone()
    x = torch.randn(4096, device=dev)
    y = x * 2  # queued before the fork
    assert prefetch.prefetch_l2_(w)
    z = y + 1  # beside it
    prefetch.join_prefetches()
    torch.cuda.synchronize()
    assert torch.equal(z, x * 2 + 1) and torch.equal(w, before) and not prefetch._pending

    # a capture that forks must join inside it (an unjoined fork fails the capture)
    out = torch.empty_like(x)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out.copy_(x * 3)
        assert prefetch.prefetch_l2_(w)
        out.add_(1)
        prefetch.join_prefetches()
    x.normal_()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, x * 3 + 1) and torch.equal(w, before)

    # a fork left pending outside a capture is not joined into one (a capture cannot wait on it)
    assert prefetch.prefetch_l2_(w)
    graph2 = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph2):
        out.copy_(x * 5)
        prefetch.join_prefetches()
    graph2.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, x * 5) and not prefetch._pending
