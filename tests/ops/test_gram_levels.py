"""The per-chunk gram (Araw, Aqk) of the chunked KDA forward, both forms (the two default launches and
the one-launch halving levels, ``gram_levels.py``), against a direct fp64 evaluation of its definition
from the same chunk-cumulated gate G. Interpreter on the CPU; the GPU case at K = 128 is marked."""

from __future__ import annotations

import pytest
import torch

from kimi_linear.ops.kda import chunk_common

triton = pytest.importorskip("triton")

from kimi_linear.ops.kda.chunk_fwd import chunk_kda_fwd  # noqa: E402
from kimi_linear.ops.kda.gram_levels import gram_levels  # noqa: E402


@pytest.fixture(autouse=True)
def _poison(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chunk_common, "POISON", True)  # an unwritten lower-triangle entry stays NaN


def direct_gram(q, k, G, table):
    """fp64 ``Araw[t, i] = sum_c k_t k_i e^{G_t - G_i}`` (i < t) and ``Aqk`` (i <= t) per chunk, as
    ``[Ttot, HV, 64]`` with NaN above the diagonal and past each chunk's end (entries not compared)."""
    Ttot, H, K = q.shape
    HV = G.shape[1]
    out = {n: torch.full((Ttot, HV, 64), float("nan"), dtype=torch.float64) for n in ("Araw", "Aqk")}
    qh = q.double().repeat_interleave(HV // H, dim=1)
    kh = k.double().repeat_interleave(HV // H, dim=1)
    for t0, n in zip(table.chunk_start.tolist(), table.chunk_len.tolist()):
        g = G[t0:t0 + n].double()  # [n, HV, K]
        dec = torch.exp(g[:, None] - g[None, :])  # [t, i, HV, K]; only i <= t is used
        low = torch.tril(torch.ones(n, n, dtype=torch.bool))
        for name, x, diag in (("Aqk", qh, 0), ("Araw", kh, -1)):
            a = torch.einsum("thc,ihc,tihc->hti", x[t0:t0 + n], kh[t0:t0 + n], torch.where(
                low[:, :, None, None], dec, 0.0))
            mask = torch.tril(torch.ones(n, n, dtype=torch.bool), diagonal=diag)
            a = torch.where(mask, a, float("nan")).permute(1, 0, 2)  # [t, HV, i]
            out[name][t0:t0 + n, :, :n] = a
            if name == "Araw":
                out[name][t0:t0 + n, :, :n][torch.eye(n, dtype=torch.bool)[:, None, :].expand(n, HV, n)] = 0.0
    return out


def run_gram(offsets, H, HV, K, gate, seed, monkeypatch, **levels):
    """The forward's Araw / Aqk and G for one packed input, with the launch-table entry gram_levels set."""
    monkeypatch.setitem(chunk_common.LAUNCH, "gram_levels", {**chunk_common.LAUNCH["gram_levels"], **levels})
    gen = torch.Generator().manual_seed(seed)
    T = offsets[-1]
    q = torch.nn.functional.normalize(torch.randn(T, H, K, generator=gen), dim=-1)
    k = torch.nn.functional.normalize(torch.randn(T, H, K, generator=gen), dim=-1)
    v = torch.randn(T, HV, 16, generator=gen)
    g = gate(torch.rand(T, HV, K, generator=gen))
    beta = torch.rand(T, HV, generator=gen)
    table = chunk_common.build_chunk_table(offsets, torch.device("cpu"))
    _, _, saved = chunk_kda_fwd(q, k, v, g, beta, scale=K ** -0.5, initial_state=None, output_final_state=False,
                                table=table, A_log=None, dt_bias=None, beta_sigmoid=False)
    return q, k, saved, table


# gates: moderate (the default kernels' off-diagonal references matter), and huge / mixed (exactness for
# any gate: most decays underflow, a few channels keep theirs, so some products are tiny but not 0)
GATES = {
    "moderate": lambda u: -3.0 * u,
    "huge_mixed": lambda u: torch.where(u > 0.8, -1e4 * u, -0.05 * u),
}


@pytest.mark.parametrize("gate", list(GATES))
@pytest.mark.parametrize("levels", [dict(on=0), dict(on=1), dict(on=1, split=2), dict(on=1, split=3, BK=16),
                                    dict(on=1, split=6, guard=0)], ids=lambda d: "-".join(f"{k}{v}" for k, v in d.items()))
def test_gram_matches_definition(levels, gate, monkeypatch):
    # sequences ending mid-level (1, 37 and 130 tokens: chunks of 1, 37, 64, 64, 2 rows), GVA (2 value heads
    # per q/k head)
    offsets = [0, 1, 38, 168]
    q, k, saved, table = run_gram(offsets, H=1, HV=2, K=32, gate=GATES[gate], seed=3, monkeypatch=monkeypatch,
                                  **levels)
    want = direct_gram(q, k, saved["G"], table)
    for name in ("Araw", "Aqk"):
        got, ref = saved[name].double(), want[name]
        used = ~torch.isnan(ref)
        assert not torch.isnan(got[used]).any(), f"{name}: lower-triangle entries left unwritten"
        err = (got[used] - ref[used]).abs().max().item()
        assert err <= 1e-5, f"{name}: max abs error {err:.2e}"


def test_gram_levels_rejects_a_split_that_does_not_divide_the_levels(monkeypatch):
    with pytest.raises(ValueError, match="split must divide 6"):
        run_gram([0, 64], H=1, HV=1, K=16, gate=GATES["moderate"], seed=0, monkeypatch=monkeypatch, on=1, split=4)


def test_gram_levels_direct_call_needs_no_forward(monkeypatch):
    # the helper alone fills every lower-triangle entry of fresh (poisoned) buffers
    offsets = [0, 20]
    q, k, saved, table = run_gram(offsets, H=1, HV=1, K=16, gate=GATES["moderate"], seed=1, monkeypatch=monkeypatch)
    Araw = chunk_common.alloc(saved["Araw"].shape, torch.float32, q.device)
    Aqk = chunk_common.alloc(saved["Aqk"].shape, torch.float32, q.device)
    gram_levels(q, k, saved["G"], Araw, Aqk, table, prec="tf32x3", cfg=dict(BK=16, split=1))
    low = torch.tril(torch.ones(20, 64, dtype=torch.bool))[:, None, :]
    assert torch.allclose(Aqk[low[:, :, :]], saved["Aqk"][low], atol=1e-6)
    assert torch.allclose(Araw[low], saved["Araw"][low], atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("levels", [dict(on=0), dict(on=1), dict(on=1, split=3), dict(on=1, guard=0)],
                         ids=lambda d: "-".join(f"{k}{v}" for k, v in d.items()))
def test_gram_gpu_matches_definition(levels, monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    monkeypatch.setitem(chunk_common.LAUNCH, "gram_levels", {**chunk_common.LAUNCH["gram_levels"], **levels})
    offsets = [0, 1, 200, 300]
    gen = torch.Generator().manual_seed(4)
    T, H, HV, K = offsets[-1], 2, 4, 128
    dev = torch.device("cuda")
    q = torch.nn.functional.normalize(torch.randn(T, H, K, generator=gen), dim=-1)
    k = torch.nn.functional.normalize(torch.randn(T, H, K, generator=gen), dim=-1)
    u = torch.rand(T, HV, K, generator=gen)
    g = torch.where(u > 0.9, -1e3 * u, -0.5 * u)
    table = chunk_common.build_chunk_table(offsets, dev)
    _, _, saved = chunk_kda_fwd(q.to(dev), k.to(dev), torch.randn(T, HV, 128).to(dev), g.to(dev),
                                torch.rand(T, HV).to(dev), scale=K ** -0.5, initial_state=None,
                                output_final_state=False, table=table, A_log=None, dt_bias=None, beta_sigmoid=False)
    cpu_table = chunk_common.build_chunk_table(offsets, torch.device("cpu"))
    want = direct_gram(q, k, saved["G"].cpu(), cpu_table)
    for name in ("Araw", "Aqk"):
        got, ref = saved[name].cpu().double(), want[name]
        used = ~torch.isnan(ref)
        assert not torch.isnan(got[used]).any(), f"{name}: lower-triangle entries left unwritten"
        err = (got[used] - ref[used]).abs().max().item()
        assert err <= 2e-5, f"{name}: max abs error {err:.2e}"  # fp32 inputs: 3-pass tf32 dots
