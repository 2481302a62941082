"""The one-token MoE in one persistent launch (ops/moe_one_kernel.py) == the two launches, to the bit."""

from __future__ import annotations

import pytest
import torch

import kimi_linear.ops.moe_decode as md
from kimi_linear.ops.moe_decode import ExpertSync, moe_decode
from tests.generation.test_moe_decode import benchmark_experts


def _experts(device, shared: int, E=7, D=72, I=40):  # noqa: E741
    mk = lambda *s: torch.randn(*s, device=device) / s[-1] ** 0.5  # noqa: E731
    w1, w3, w2 = [mk(I, D) for _ in range(E)], [mk(I, D) for _ in range(E)], [mk(D, I) for _ in range(E)]
    sh = tuple([mk(*s) for _ in range(shared)] for s in ((I, D), (I, D), (D, I))) if shared else None
    return w1, w3, w2, sh


class _Launches:
    """Records what :func:`md._launch_persistent` returned (False: it launched nothing) and optionally runs
    the two phases apart with given program counts (the interpreter cannot wait for a later program)."""

    def __init__(self, monkeypatch, split: tuple[int, int] | None = None):
        self.results = []
        real = md._launch_persistent

        def spy(args, consts, dev, sync, nprog=None, phases=3):
            if split is None:
                out = real(args, consts, dev, sync, nprog, phases)
            else:
                real(args, consts, dev, sync, split[0], 1)
                out = real(args, consts, dev, sync, split[1], 2)
            self.results.append(out)
            return out

        monkeypatch.setattr(md, "_launch_persistent", spy)


def _same_tiles(monkeypatch, warps: int, gu_rows: int, dn_rows: int, gu_d: int | None = None, dn_i: int | None = None):
    """The two launches and the persistent one on the same tiles (so the same reduction order: equal bits)."""
    gu, dn = md.TILES["gate_up_one"], md.TILES["down_one"]
    monkeypatch.setitem(md.TILES, "gate_up_one", dict(BLOCK_R=gu_rows, BLOCK_D=gu_d or gu["BLOCK_D"], num_warps=warps))
    monkeypatch.setitem(md.TILES, "down_one", dict(BLOCK_R=dn_rows, BLOCK_I=dn_i or dn["BLOCK_I"], num_warps=warps))
    for key, value in dict(num_warps=warps, gu_rows=gu_rows, dn_rows=dn_rows).items():
        monkeypatch.setitem(md.PERSISTENT_TILE, key, value)


def _small_tiles(monkeypatch):
    # row counts that are not multiples of the tiles
    _same_tiles(monkeypatch, 1, 8, 8, 32, 16)


@pytest.mark.parametrize("shared", [0, 2])
@pytest.mark.parametrize("fold", [False, True])
def test_persistent_launch_equals_the_two_launches(shared, fold, monkeypatch, triton_device):
    device = triton_device
    _small_tiles(monkeypatch)
    w1, w3, w2, sh = _experts(device, shared)
    D = w1[0].shape[1]
    x = torch.randn(1, D, device=device) * 3.0
    idx, w = torch.tensor([[5, 1, 3]], device=device), torch.rand(1, 3, device=device)
    kw = dict(shared=sh, backend="triton")
    if fold:
        kw.update(norm_weight=torch.rand(D, device=device) + 0.5, eps=1e-5, residual=torch.randn(1, D, device=device))
    for e in (0, 2, 4, 6):  # unchosen experts: never read
        for t in (w1[e], w3[e], w2[e]):
            t.fill_(float("nan"))
    monkeypatch.setattr(md, "PERSISTENT_ONE", False)
    want = moe_decode(x, idx, w, w1, w3, w2, sync=ExpertSync(), **kw)
    monkeypatch.setattr(md, "PERSISTENT_ONE", True)
    launches, sync = _Launches(monkeypatch), ExpertSync()
    for _ in range(3):  # the counters are left at zero for the next call
        got = moe_decode(x, idx, w, w1, w3, w2, sync=sync, **kw)
        assert torch.equal(got, want)
        assert not sync.counters.any()  # left at zero for the next call
    assert len(launches.results) == 3 and all(launches.results)
    # without a sync (or with the switch off) the two launches run
    assert torch.equal(moe_decode(x, idx, w, w1, w3, w2, **kw), want) and len(launches.results) == 3


@pytest.mark.parametrize("programs", [(3, 5), (7, 2), (64, 64)])
def test_persistent_walks_cover_every_block_once(programs, monkeypatch, triton_device):
    # each phase's walk with several programs: shared slots' gate/up blocks first, then the routed ones
    # from each program's first routed block on; down rows u = pid (mod NPROG)
    device = triton_device
    _small_tiles(monkeypatch)
    w1, w3, w2, sh = _experts(device, 2)
    x = torch.randn(1, w1[0].shape[1], device=device)
    idx, w = torch.tensor([[6, 0, 2]], device=device), torch.rand(1, 3, device=device)
    monkeypatch.setattr(md, "PERSISTENT_ONE", False)
    want = moe_decode(x, idx, w, w1, w3, w2, shared=sh, backend="triton")
    monkeypatch.setattr(md, "PERSISTENT_ONE", True)
    launches = _Launches(monkeypatch, split=programs)
    poisoned = torch.empty

    def nan_empty(*a, **k):  # h and y start as NaN: a block no program walks shows
        t = poisoned(*a, **k)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", nan_empty)
    got = moe_decode(x, idx, w, w1, w3, w2, shared=sh, sync=ExpertSync(), backend="triton")
    assert launches.results == [True] and torch.equal(got, want)


def test_sync_must_be_an_expert_sync():
    x, ws = torch.randn(1, 16), [[torch.randn(8, 16)], [torch.randn(8, 16)], [torch.randn(16, 8)]]
    with pytest.raises(TypeError, match="sync must be a moe_decode.ExpertSync"):
        moe_decode(x, torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1), *ws, sync=torch.zeros(2))


def test_resident_programs_follow_the_compiled_kernel(monkeypatch):
    # the program count per SM is the least of registers (per warp, units of 256), threads, shared
    # memory (+1 KB per program) and 32 block slots
    class Props:
        regs_per_multiprocessor, max_threads_per_multi_processor, shared_memory_per_multiprocessor = 65536, 2048, 233472

    class Compiled:
        class metadata:  # noqa: N801
            num_warps, shared = 1, 8

        n_regs = 66

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda dev: Props)
    assert md._resident_programs(Compiled, torch.device("cuda")) == 28  # 65536 // 2304
    Compiled.n_regs, Compiled.metadata.num_warps = 32, 1
    assert md._resident_programs(Compiled, torch.device("cuda")) == 32  # block slots
    Compiled.n_regs, Compiled.metadata.num_warps = 128, 4
    assert md._resident_programs(Compiled, torch.device("cuda")) == 4
    Compiled.n_regs, Compiled.metadata.shared = 32, 100_000
    assert md._resident_programs(Compiled, torch.device("cuda")) == 2  # 233472 // 101024


@pytest.mark.gpu
@pytest.mark.parametrize("prefetch", [0, 1])
def test_persistent_moe_gpu_at_the_benchmark_geometry(prefetch, monkeypatch, cuda_device):
    # bf16, 16 experts top-8 + a shared one, the decode step's folded norm and residual, the shared
    # slots before the PDL wait (x_ready): equal to the bit to the two launches, over fresh inputs
    # (a race in the count would show as a mismatch), eager and replayed from a CUDA graph
    monkeypatch.setitem(md.PERSISTENT_TILE, "dn_prefetch", prefetch)
    pt = md.PERSISTENT_TILE
    _same_tiles(monkeypatch, pt["num_warps"], pt["gu_rows"], pt["dn_rows"])
    w1, w3, w2, sh, idx, w = benchmark_experts(cuda_device)
    D = w1[0].shape[1]
    nw = (torch.rand(D, device=cuda_device) + 0.5).to(torch.bfloat16)
    sync = ExpertSync()
    launches = _Launches(monkeypatch)

    def run(h, res, ix, wt, persistent):
        monkeypatch.setattr(md, "PERSISTENT_ONE", persistent)
        return moe_decode(h, ix, wt, w1, w3, w2, shared=sh, norm_weight=nw, eps=1e-5, residual=res, x_ready=True,
                          sync=sync, backend="triton")

    for _ in range(50):
        h = torch.randn(1, D, device=cuda_device, dtype=torch.bfloat16) * 4.0
        res = torch.randn(1, D, device=cuda_device, dtype=torch.bfloat16)
        ix, wt = torch.randperm(16, device=cuda_device)[:8][None], torch.rand(1, 8, device=cuda_device)
        assert torch.equal(run(h, res, ix, wt, True), run(h, res, ix, wt, False))
    assert all(launches.results) and not sync.counters.any()
    # replayed from a graph with new values in the same buffers
    h, res = torch.randn(1, D, device=cuda_device, dtype=torch.bfloat16), torch.randn(1, D, device=cuda_device, dtype=torch.bfloat16)
    ix, wt = idx.clone(), w.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run(h, res, ix, wt, True)
    for _ in range(20):
        h.copy_(torch.randn_like(h))
        res.copy_(torch.randn_like(res))
        ix.copy_(torch.randperm(16, device=cuda_device)[:8][None])
        wt.copy_(torch.rand_like(wt))
        graph.replay()
        assert torch.equal(out, run(h, res, ix, wt, False))
    assert not sync.counters.any()  # left at zero for the next call


@pytest.mark.gpu
def test_expert_sync_is_not_made_inside_a_capture(cuda_device):
    # a zero fill captured into a graph would not run before later eager calls: the caller falls back
    sync, stream = ExpertSync(), torch.cuda.Stream()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        assert sync.get(cuda_device, 64) is None
    first = sync.get(cuda_device, 64)
    assert first.numel() == 64 and not first.any()
    assert sync.get(cuda_device, 32) is first  # large enough: kept
    assert sync.get(cuda_device, 96).numel() == 96 and sync._retired == [first]  # the old one stays alive
