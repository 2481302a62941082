"""Can a warp-specialised kernel stream a decode GEMV's weight closer to the copy rate? (issues 5 and 7)

Every batch-1 decode kernel of ours is a Triton (``tl``) kernel whose warps each load, wait and multiply
in turn; the large ones reach 82-88% of the H100's copy rate in the model (MoE gate_up 32 us for 85 MB,
down 17 us for 43 MB, docs/decode.md) and the latent split kernel ~80% at 128K keys. Triton 3.6's ``tl``
warp-specialises loops on Blackwell only; its Gluon dialect (``triton.experimental.gluon``) does it on
Hopper with explicit shared memory, mbarriers and TMA. This probe is one batch-1 matrix-vector product
``y = W x`` (bf16, fp32 sums) written that way -- one loader warp streaming ``[BR, BD]`` weight tiles by
TMA into a ring of NS shared-memory stages, the default warps multiplying -- and timed beside the
library's ``fused_linear`` (the decode step's projections) and cuBLAS on the same weights, every call
graph-replayed back to back on weights that do not fit in L2. Correctness gate: each provider against
the fp32 product before timing.

    PYTHONPATH=. python benchmarks/gluon_gemv_probe.py            # H100/H200: the table
    PYTHONPATH=. python benchmarks/gluon_gemv_probe.py --compile  # any machine: sm_90a registers/shared memory
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor


@gluon.jit
def _tile_loader(w_desc, bufs, ready, empty, n_rb, D, BR: gl.constexpr, BD: gl.constexpr):
    # one warp: waits for a free stage, asks the copy engine for the next tile; the same tile order as
    # the consumer (row blocks of this program, D slices in order)
    NS: gl.constexpr = bufs.type.shape[0]
    i = 0
    for rb in range(gl.program_id(0), n_rb, gl.num_programs(0)):
        for d0 in range(0, D, BD):
            s = i % NS
            mbarrier.wait(empty.index(s), ((i // NS) & 1) ^ 1)  # a fresh barrier's phase 1 counts as done
            mbarrier.expect(ready.index(s), w_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(w_desc, [rb * BR, d0], ready.index(s), bufs.index(s))
            i += 1


@gluon.jit
def _tile_consumer(x_ptr, y_ptr, bufs, ready, empty, n_rb, D, BR: gl.constexpr, BD: gl.constexpr,
                   layout: gl.constexpr):
    # the default warps: x's slice from L2 while the tile lands, the tile to registers, the stage freed,
    # then the row sums; one store per row block
    NS: gl.constexpr = bufs.type.shape[0]
    i = 0
    for rb in range(gl.program_id(0), n_rb, gl.num_programs(0)):
        acc = gl.zeros([BR], gl.float32, gl.SliceLayout(1, layout))
        for d0 in range(0, D, BD):
            s = i % NS
            o_d = d0 + gl.arange(0, BD, gl.SliceLayout(0, layout))
            x = gl.load(x_ptr + o_d).to(gl.float32)
            mbarrier.wait(ready.index(s), (i // NS) & 1)
            w = bufs.index(s).load(layout).to(gl.float32)
            mbarrier.arrive(empty.index(s), count=1)
            acc += gl.sum(w * gl.expand_dims(x, 0), axis=1)
            i += 1
        o_r = rb * BR + gl.arange(0, BR, gl.SliceLayout(1, layout))
        gl.store(y_ptr + o_r, acc.to(y_ptr.dtype.element_ty))


@gluon.jit
def ws_gemv_kernel(w_desc, x_ptr, y_ptr, n_rb, D, NS: gl.constexpr, num_warps: gl.constexpr):
    """``y [R] = W [R, D] @ x [D]``; R a multiple of the tile's BR, D of its BD (the probe's shapes)."""
    BR: gl.constexpr = w_desc.block_type.shape[0]
    BD: gl.constexpr = w_desc.block_type.shape[1]
    layout: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [num_warps, 1], [1, 0])
    bufs = gl.allocate_shared_memory(w_desc.dtype, [NS, BR, BD], w_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [NS, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [NS, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(NS):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=1)
    gl.warp_specialize([
        (_tile_consumer, (x_ptr, y_ptr, bufs, ready, empty, n_rb, D, BR, BD, layout)),
        (_tile_loader, (w_desc, bufs, ready, empty, n_rb, D, BR, BD)),
    ], [1], [24])


def _descriptor(w: torch.Tensor, br: int, bd: int) -> TensorDescriptor:
    return TensorDescriptor.from_tensor(w, [br, bd], gl.NVMMASharedLayout.get_default_for([br, bd], gl.bfloat16))


def ws_gemv(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor, *, br: int, bd: int, stages: int, warps: int,
            programs: int) -> torch.Tensor:
    R, D = w.shape
    if R % br or D % bd:
        raise ValueError(f"the probe needs R % {br} == 0 and D % {bd} == 0, got {tuple(w.shape)}")
    n_rb = R // br
    ws_gemv_kernel[(min(programs, n_rb),)](_descriptor(w, br, bd), x, y, n_rb, D, NS=stages, num_warps=warps,
                                           maxnreg=128)
    return y


def compile_report(br: int = 64, bd: int = 256, stages: int = 4, warps: int = 4) -> str:
    """Registers, spills and shared memory of the kernel for sm_90a, without a GPU (Triton's ptxas)."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    desc = _descriptor(torch.empty(4 * br, 2 * bd, dtype=torch.bfloat16), br, bd)
    sig = dict(w_desc=mangle_type(desc), x_ptr="*bf16", y_ptr="*bf16", n_rb="i32", D="i32", NS="constexpr",
               num_warps="constexpr")
    k = triton.compile(GluonASTSource(fn=ws_gemv_kernel, signature=sig, constexprs={"NS": stages, "num_warps": warps}),
                       target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=warps, maxnreg=128))
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(k.asm["ptx"])
    try:
        err = subprocess.run([ptxas, "-arch=sm_90a", "-v", f.name, "-o", os.devnull], capture_output=True,
                             text=True).stderr
    finally:
        os.unlink(f.name)
    used = next((ln.split("Used")[1].strip() for ln in err.splitlines() if "Used" in ln), "?")
    spill = next((ln.split("stack frame,")[1].strip() for ln in err.splitlines() if "spill" in ln), "?")
    ws = "warpgroup" if "setmaxnreg" in k.asm["ptx"] else "no setmaxnreg"
    return f"ws_gemv BR={br} BD={bd} NS={stages} warps={warps}: {used}, {spill}, shared {k.metadata.shared} B, {ws}"


def _graph_ms(fn, reps: int = 20, rounds: int = 5) -> float:
    """Median per-call ms of ``reps`` calls captured in one CUDA graph and replayed (no launch gaps)."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / reps)
    return sorted(times)[len(times) // 2]


def _read_rate(dev: torch.device) -> float:
    """Bytes per second of the faster of a sum and a max over 1 GiB of fp16 (a read-only stream)."""
    big = torch.empty(2**29, dtype=torch.float16, device=dev).normal_()
    return max(big.numel() * 2 / (_graph_ms(lambda: big.sum(dtype=torch.float32), reps=5) * 1e-3),
               big.numel() * 2 / (_graph_ms(lambda: big.amax(), reps=5) * 1e-3))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--compile", action="store_true", help="only the sm_90a compile report (no GPU needed)")
    args = ap.parse_args()
    # (BR, BD, stages, default warps): tiles of 8-32 KB, 64-128 KB of them in flight per SM
    configs = [(32, 128, 8, 4), (32, 256, 6, 4), (16, 512, 6, 4), (64, 256, 3, 8)]
    if args.compile:
        for c in configs:
            print(compile_report(*c), flush=True)
        return
    from kimi_linear.bench.common import copy_bandwidth, rel_rms
    from kimi_linear.ops.gemv import fused_linear

    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    copy = copy_bandwidth(dev)
    # a read-only stream's rate: a GEMV only reads, and HBM may read faster or slower than it copies
    read = _read_rate(dev)
    print(f"{torch.cuda.get_device_name(dev)}, torch {torch.__version__}, triton {triton.__version__}; "
          f"copy rate {copy / 1e12:.2f} TB/s (bytes read + written per second by a 1 GiB copy, the floors' rate); "
          f"read rate {read / 1e12:.2f} TB/s (the faster of a sum and a max over 1 GiB)")
    # (rows, D, what): the MoE gate_up of the decode benchmark (9 experts x 2 x 1024 rows), a KDA layer's
    # input projections, a KDA output projection (4096 -> 2304); copies so that every call reads cold weights
    shapes = [(18432, 2304, "MoE gate_up, 9 experts"), (12544, 2304, "KDA inputs"), (2304, 4096, "KDA output proj")]
    print("| weight | MB | provider | us | TB/s | of copy rate | of read rate | gate |\n|---|---|---|---|---|---|---|---|")
    for R, D, what in shapes:
        nbytes = R * D * 2
        copies = max(1, -(-160 * 2**20 // nbytes))  # > 3x the 50 MB L2 between two reads of one copy
        ws = [torch.randn(R, D, device=dev, dtype=torch.bfloat16) * D**-0.5 for _ in range(copies)]
        x = torch.randn(1, D, device=dev, dtype=torch.bfloat16)
        ref = ws[0].float() @ x[0].float()
        y = torch.empty(R, device=dev, dtype=torch.bfloat16)
        providers = {"cublas": lambda w, x=x: torch.nn.functional.linear(x, w),
                     "fused_linear": lambda w, x=x: fused_linear(x, [w])[0]}
        for br, bd, ns, nw in configs:
            if R % br == 0 and D % bd == 0:
                # persistent (one program per SM walking row blocks) or one program per row block
                for grid, progs in (("per SM", sms), ("per block", R // br)):
                    providers[f"gluon ws {br}x{bd} x{ns} {nw}w, {grid}"] = (
                        lambda w, br=br, bd=bd, ns=ns, nw=nw, progs=progs, x=x, y=y: ws_gemv(
                            w, x[0], y, br=br, bd=bd, stages=ns, warps=nw, programs=progs))
        for name, fn in providers.items():
            try:
                y.fill_(float("nan"))
                err = rel_rms(fn(ws[0]).reshape(-1).float(), ref)
                gate = "ok" if err < 1e-2 else f"FAILED ({err:.1e})"
                if err >= 1e-2:
                    print(f"| {what} | {nbytes / 1e6:.1f} | {name} | - | - | - | - | {gate} |")
                    continue
                for w in ws[1:]:  # first calls outside the capture (fused_linear builds its address table)
                    fn(w)
                i = iter(range(10**9))
                ms = _graph_ms(lambda fn=fn, ws=ws, i=i, copies=copies: fn(ws[next(i) % copies]))
                rate = nbytes / (ms * 1e-3)
                print(f"| {what} | {nbytes / 1e6:.1f} | {name} | {ms * 1e3:.1f} | {rate / 1e12:.2f} | "
                      f"{rate / copy:.0%} | {rate / read:.0%} | {gate} |", flush=True)
            except Exception as exc:  # a variant that does not compile or launch: say so, go on
                print(f"| {what} | {nbytes / 1e6:.1f} | {name} | - | - | - | - | error: {type(exc).__name__}: "
                      f"{str(exc).splitlines()[0][:120]} |", flush=True)


if __name__ == "__main__":
    main()
