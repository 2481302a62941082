"""Absorbed (latent) MLA attention == the expanded form, fp32/fp64 tight; masking by lengths; bad input."""

from __future__ import annotations

import pytest
import torch

from kimi_linear.ops.latent_attention import (
    expanded_attention_ref,
    latent_attention,
    latent_attention_ref,
    mask_from_lengths,
)
from tests.numerics import poison_, rel_rms, tolerance


class _Recorder:
    """Stands in for a Triton kernel: records ``name`` in ``log`` when a launch indexes it, then launches it."""

    def __init__(self, kernel, name, log):
        self.kernel, self.name, self.log = kernel, name, log

    def __getitem__(self, grid):
        self.log.append(self.name)
        return self.kernel[grid]


def inputs(B=3, T=1, H=4, Dn=8, Dr=4, Dv=6, R=16, L=11, dtype=torch.float32):
    return (torch.randn(B, T, H, Dn, dtype=dtype), torch.randn(B, T, H, Dr, dtype=dtype),
            torch.randn(B, L, R, dtype=dtype), torch.randn(B, L, Dr, dtype=dtype),
            torch.randn(H * (Dn + Dv), R, dtype=dtype) / R**0.5)


@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
def test_absorbed_equals_expanded(T, dtype, tol):
    args = inputs(T=T, dtype=dtype)
    lengths = torch.tensor([11, 5, 3])
    out = latent_attention_ref(*args, lengths=lengths)
    ref = expanded_attention_ref(*args, lengths=lengths)
    assert out.shape == (3, T, 4, 6) and out.dtype == dtype
    assert rel_rms(out, ref) < tol


def test_matches_explicit_softmax_attention_and_ignores_masked_positions():
    q_nope, q_rope, latent, k_rope, w = inputs(B=2, L=7, dtype=torch.float64)
    lengths = torch.tensor([7, 4])
    out = latent_attention_ref(q_nope, q_rope, latent, k_rope, w, lengths=lengths)
    # garbage beyond each row's length must not matter
    latent2, k_rope2 = latent.clone(), k_rope.clone()
    latent2[1, 4:] = 1e6
    k_rope2[1, 4:] = float("nan")
    out2 = latent_attention_ref(q_nope, q_rope, latent2, k_rope2, w, lengths=lengths)
    assert torch.equal(out, out2) or rel_rms(out2, out) < 1e-14
    # explicit per-head loop for row 1
    H, Dn, Dv = 4, 8, 6
    wv = w.view(H, Dn + Dv, -1)
    for h in range(H):
        k = torch.cat([latent[1, :4] @ wv[h, :Dn].T, k_rope[1, :4]], dim=-1)
        v = latent[1, :4] @ wv[h, Dn:].T
        q = torch.cat([q_nope[1, 0, h], q_rope[1, 0, h]])
        p = torch.softmax(k @ q * (Dn + 4) ** -0.5, dim=0)
        assert torch.allclose(out[1, 0, h], p @ v, atol=1e-12)


def test_multi_token_queries_are_causal():
    args = inputs(B=1, T=3, L=6, dtype=torch.float64)
    out = latent_attention_ref(*args, lengths=torch.tensor([6]))
    m = mask_from_lengths(torch.tensor([6]), 3, 6)
    assert m[0].sum(-1).tolist() == [4, 5, 6]
    # the first query equals a single-token call with lengths 4
    single = latent_attention_ref(args[0][:, :1], args[1][:, :1], *args[2:], lengths=torch.tensor([4]))
    assert rel_rms(out[:, :1], single) < 1e-14


def test_key_mask_path_and_empty_rows():
    args = inputs(B=2, T=2, L=5)
    km = torch.zeros(2, 2, 5, dtype=torch.bool)
    km[0, :, :3] = True
    out = latent_attention(*args, key_mask=km, backend="reference")
    assert torch.isfinite(out).all() and out[1].abs().max() == 0
    assert rel_rms(out, expanded_attention_ref(*args, key_mask=km)) < 2e-6


def test_bad_input():
    q_nope, q_rope, latent, k_rope, w = inputs()
    with pytest.raises(ValueError, match="exactly one"):
        latent_attention_ref(q_nope, q_rope, latent, k_rope, w)
    with pytest.raises(ValueError, match="k_rope"):
        latent_attention_ref(q_nope, q_rope, latent, k_rope[:, :3], w, lengths=torch.tensor([1, 1, 1]))
    with pytest.raises(ValueError, match="lengths"):
        latent_attention_ref(q_nope, q_rope, latent, k_rope, w, lengths=torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="w_kv_b"):
        latent_attention_ref(q_nope, q_rope, latent, k_rope, w[:, :5], lengths=torch.tensor([1, 1, 1]))
    with pytest.raises(TypeError):
        latent_attention_ref(q_nope.long(), q_rope, latent, k_rope, w, lengths=torch.tensor([1, 1, 1]))


@pytest.mark.parametrize("absorb", [True, False], ids=["triton_absorb", "matmul_absorb"])
@pytest.mark.parametrize("T,splits", [(1, None), (1, 3), (2, 2)])
def test_triton_kernel_matches_reference(T, splits, absorb, monkeypatch):
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and not __import__("kimi_linear.backends").backends.triton_interpret():
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    from kimi_linear.ops import latent_attention_triton as lt
    from kimi_linear.ops.latent_attention_triton import latent_attention_triton

    monkeypatch.setattr(lt, "TRITON_ABSORB", absorb)  # 3 or 6 tokens: within the Triton absorbs' limit

    device = "cuda" if torch.cuda.is_available() else "cpu"
    args = [a.to(device) for a in inputs(B=3, T=T, H=4, Dn=16, Dr=16, Dv=16, R=32, L=37)]
    lengths = torch.tensor([37, 20, 2], device=device)
    out = latent_attention_triton(*args, lengths=lengths, block_n=16, num_splits=splits)
    ref = expanded_attention_ref(*args, lengths=lengths)
    # tf32 dots on GPU; under the CPU interpreter the dots are true fp32 (measured ~2e-7)
    tol = 2e-3 if torch.cuda.is_available() else tolerance("kernel_interp", torch.float32)
    assert rel_rms(out, ref) < tol


def _triton_device() -> str:
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and not __import__("kimi_linear.backends").backends.triton_interpret():
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("kernel", ["rows_major", "keys_major", "keys_major_tma"])
@pytest.mark.parametrize("T,splits", [(1, 5), (2, 3), (2, 5)])
def test_triton_split_merge_with_empty_splits_and_keyless_rows(T, splits, kernel, monkeypatch):
    """Several splits (S = 5 or 3 at L=80, block_n=16: not powers of two), rows whose keys end early
    so that later splits are empty, a row of length 0 (no query sees a key) and, for T=2, a row of
    length 1 (its first query sees no key, its second one key): fp32 against the expanded reference,
    zeros for keyless queries; both split kernels, the keys-major one also through TMA. The cache rows
    past each length hold NaN (never written), which no kernel may let into its products."""
    device = _triton_device()
    from kimi_linear.ops import latent_attention_triton as lt
    from kimi_linear.ops.latent_attention_triton import latent_attention_triton

    monkeypatch.setitem(lt.TILES, "keys_major_from", 1 << 62 if kernel == "rows_major" else 0)
    monkeypatch.setitem(lt.TILES, "keys_major_tma", int(kernel == "keys_major_tma"))
    launched = []
    if kernel != "rows_major":  # the launch's TMA switch as the table asks
        real = lt._latent_attn_split_keys_major_kernel

        class Spy:
            def __getitem__(self, grid):
                def launch(*a, **kw):
                    launched.append(kw.get("TMA", False))
                    return real[grid](*a, **kw)
                return launch
        monkeypatch.setattr(lt, "_latent_attn_split_keys_major_kernel", Spy())

    args = [a.to(device) for a in inputs(B=4, T=T, H=2, Dn=16, Dr=16, Dv=16, R=32, L=80)]
    lengths = torch.tensor([80, 21, 0, 1], device=device)
    ref = expanded_attention_ref(*args, lengths=lengths)
    for b, n in enumerate(lengths.tolist()):
        args[2][b, n:] = float("nan")
        args[3][b, n:] = float("nan")
    out = latent_attention_triton(*args, lengths=lengths, block_n=16, num_splits=splits)
    assert launched == ([] if kernel == "rows_major" else [kernel == "keys_major_tma"])
    assert torch.isfinite(out).all()
    assert out[2].abs().max() == 0
    if T == 2:
        assert out[3, 0].abs().max() == 0 and out[3, 1].abs().max() > 0
    tol = 2e-3 if torch.cuda.is_available() else 1e-5
    assert rel_rms(out, ref) < tol
    for b in range(4):  # per row, so that a wrong short row is not hidden by the long one
        if ref[b].abs().max() > 0:
            assert rel_rms(out[b], ref[b]) < tol, b


@pytest.mark.parametrize("tiles", [dict(head_groups=2), dict(head_groups=4), dict(min_block_m=64),
                                   dict(head_groups=2, splits_per_sm=1), dict(keys_major_from=0),
                                   dict(keys_major_from=0, keys_major_rows=16)], ids=str)
def test_triton_row_groups_and_padded_rows(tiles, monkeypatch):
    """The launch table's row layouts: the 2 x 17 query rows (T=2, H=17: 34 rows, not a multiple of
    16) split over 2 or 4 programs per key split (the last group partly empty), or padded to 64 rows;
    fp32 against the expanded reference, per row, with causal limits and a row without keys."""
    device = _triton_device()
    from kimi_linear.ops import latent_attention_triton as lt

    for name, value in tiles.items():
        monkeypatch.setitem(lt.TILES, name, value)
    args = [a.to(device) for a in inputs(B=3, T=2, H=17, Dn=16, Dr=16, Dv=16, R=32, L=45)]
    lengths = torch.tensor([45, 18, 0], device=device)
    out = lt.latent_attention_triton(*args, lengths=lengths, block_n=16, num_splits=3)
    ref = expanded_attention_ref(*args, lengths=lengths)
    assert torch.isfinite(out).all() and out[2].abs().max() == 0
    tol = 2e-3 if torch.cuda.is_available() else 1e-5
    for b in range(2):
        for t in range(2):
            assert rel_rms(out[b, t], ref[b, t]) < tol, (b, t)


def test_triton_split_kernel_chosen_by_context(monkeypatch):
    """TILES["keys_major_from"]: spans of that many keys or more take the keys-major split kernel,
    shorter ones the rows-major one; both against the expanded reference."""
    device = _triton_device()
    from kimi_linear.ops import latent_attention_triton as lt

    used = []
    for name in ("_latent_attn_split_kernel", "_latent_attn_split_keys_major_kernel"):
        monkeypatch.setattr(lt, name, _Recorder(getattr(lt, name), name, used))
    monkeypatch.setitem(lt.TILES, "keys_major_from", 40)
    for L, expected in ((32, "_latent_attn_split_kernel"), (48, "_latent_attn_split_keys_major_kernel")):
        args = [a.to(device) for a in inputs(B=2, T=1, H=4, Dn=16, Dr=16, Dv=16, R=32, L=L)]
        lengths = torch.tensor([L, L // 2], device=device)
        out = lt.latent_attention_triton(*args, lengths=lengths, block_n=16)
        assert used[-1] == expected, (L, used)
        assert rel_rms(out, expanded_attention_ref(*args, lengths=lengths)) < (2e-3 if torch.cuda.is_available() else 1e-5)


@pytest.mark.parametrize("T", [1, 2])
def test_triton_reads_query_slices_in_place(T):
    """The MLA decode step hands q_nope / q_rope as column slices of one projection (not contiguous):
    the kernel reads q_rope through its strides; same result as contiguous copies."""
    device = _triton_device()
    from kimi_linear.ops.latent_attention_triton import latent_attention_triton

    args = [a.to(device) for a in inputs(B=2, T=T, H=3, Dn=16, Dr=16, Dv=16, R=32, L=30)]
    q = torch.cat([args[0], args[1]], dim=-1)  # [B, T, H, Dn + Dr], as the projection lays it out
    q_nope, q_rope = q.split([16, 16], dim=-1)
    assert not q_rope.is_contiguous()
    lengths = torch.tensor([30, 11], device=device)
    got = latent_attention_triton(q_nope, q_rope, *args[2:], lengths=lengths, block_n=16, num_splits=2)
    want = latent_attention_triton(*args, lengths=lengths, block_n=16, num_splits=2)
    assert torch.equal(got, want)


@pytest.mark.parametrize("one_pass", [True, False], ids=["one_pass", "chunked"])
@pytest.mark.parametrize("S", [1, 3, 70, 132, 600])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_merge_kernel_against_full_softmax(S, dtype, one_pass, monkeypatch):
    """The merge alone on synthetic partials: each split's ``(o_s, lse_s)`` is a softmax over its own
    keys, and the merge must give the softmax over all keys. Splits without keys (lse = -inf) hold NaN
    in ``o``: they must be ignored, not multiplied by 0. The lse values are large (~100, and +250 in the
    last split of row 0) so that exp overflows unless the true max over all splits is subtracted;
    S=600 takes that max in two chunks of 512 (the chunked kernel: too many splits for one pass, so
    ``one_pass`` runs it too). Both kernels: the one-pass form (S <= 256, the decode step's) and the
    chunked one."""
    device = _triton_device()
    from kimi_linear.ops import latent_attention_triton as lt
    from kimi_linear.ops.latent_attention_triton import _merge_splits

    monkeypatch.setattr(lt, "MERGE_ONE_PASS", one_pass)
    launched = []
    for name in ("_latent_attn_merge_one_pass_kernel", "_latent_attn_merge_kernel"):
        kernel = getattr(lt, name)
        monkeypatch.setattr(lt, name, _Recorder(kernel, name, launched))

    B, M, R, n = 3, 2, 128, 4   # R=128: two programs along R when S >= 64
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(B, S, n, M, generator=g, dtype=torch.float64) * 4
    scores[:, :, :, 0] += 100.0
    scores[:, :, :, 1] += 60 * torch.rand(B, S, 1, generator=g, dtype=torch.float64)  # lse spread >> 1
    scores[0, -1, :, 1] += 250.0
    values = torch.randn(B, S, n, R, generator=g, dtype=torch.float64)
    keyless = torch.rand(B, S, generator=g) < 0.4                                      # empty splits
    keyless[1] = True                                                                   # a row with no key
    keyless[2, :-1] = True                                                              # only the last split
    keyless[0, 0] = keyless[0, -1] = False
    scores[keyless] = float("-inf")
    lse = torch.logsumexp(scores, dim=2)                                                # [B, S, M]
    # shift each split's scores so that its lse is exactly the fp32 value the kernel gets (o unchanged)
    shift = torch.where(torch.isfinite(lse), lse.float().double() - lse, 0.0)
    scores = scores + shift.unsqueeze(2)
    lse = torch.logsumexp(scores, dim=2)
    o = torch.einsum("bsnm,bsnr->bsmr", torch.softmax(scores, dim=2).nan_to_num(0.0), values)
    o[keyless] = float("nan")
    probs = torch.softmax(scores.permute(0, 3, 1, 2).reshape(B, M, S * n), dim=-1).nan_to_num(0.0)
    ref = torch.einsum("bmk,bkr->bmr", probs, values.reshape(B, S * n, R))

    out = poison_(torch.empty(B, M, R, device=device, dtype=dtype))
    _merge_splits(o.float().to(device), lse.float().to(device), out)
    assert launched == ["_latent_attn_merge_one_pass_kernel" if one_pass and S <= 256 else "_latent_attn_merge_kernel"]
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert out[1].abs().max() == 0
    # GPU: exp is ex2.approx (relative error ~|x| * 2^-22 for weights exp(x))
    tol = 8e-3 if dtype == torch.bfloat16 else 1e-5 if torch.cuda.is_available() else 1e-6
    assert rel_rms(out, ref) < tol


@pytest.mark.parametrize("keys_major", [False, True], ids=["rows_major", "keys_major"])
def test_triton_softmax_rescale_with_rising_and_falling_scores(keys_major, monkeypatch):
    """The split kernels' online softmax (running max, accumulator rescaled as it grows). Keys whose
    scores rise by ~40 (natural units) per 16-key tile for one head and fall for another, ~400 over the
    cache: a kernel that skipped a needed rescale overflows (inf / NaN), one that rescaled wrongly
    drifts; a third head's scores rise slowly. fp32 against the expanded reference, every row finite."""
    device = _triton_device()
    from kimi_linear.ops import latent_attention_triton as lt

    monkeypatch.setitem(lt.TILES, "keys_major_from", 0 if keys_major else 1 << 62)
    B, T, H, Dn, Dr, Dv, R, L = 2, 1, 3, 16, 16, 16, 32, 160
    g = torch.Generator().manual_seed(5)
    q_nope, q_rope, latent, k_rope, w = inputs(B=B, T=T, H=H, Dn=Dn, Dr=Dr, Dv=Dv, R=R, L=L)
    # the shared key part carries the trend: head h's rope query along one direction, keys growing along it
    ramp = torch.arange(L, dtype=torch.float32) / 16  # 1 per 16-key tile
    q_rope.zero_()
    q_rope[:, 0, 0, 0], q_rope[:, 0, 1, 0], q_rope[:, 0, 2, 0] = 10.0, -10.0, 0.5
    k_rope[:, :, 0] = ramp * 16.0 * (1 + 0.1 * torch.randn(B, L, generator=g))
    args = [a.to(device) for a in (q_nope, q_rope, latent, k_rope, w)]
    lengths = torch.tensor([L, 100], device=device)
    out = lt.latent_attention_triton(*args, lengths=lengths, block_n=16, num_splits=2)
    ref = expanded_attention_ref(*args, lengths=lengths)
    assert torch.isfinite(out).all()
    # GPU: the products take tf32 operands. The slow head's scores reach |s| ~ 16 with weights spread
    # over many keys, so each score's ~|s| 2^-11 error moves the output: the products emulated on the CPU
    # with operands rounded to tf32 give 1.9e-3 (batch row 0; truncated operands about twice that). A
    # skipped or wrong rescale gives inf / NaN or errors of order 1.
    tol = 1e-2 if torch.cuda.is_available() else 1e-5
    for b in range(B):
        for h in range(H):
            err = rel_rms(out[b, 0, h], ref[b, 0, h])
            assert err < tol, (b, h, err)


@pytest.mark.parametrize("keys_major", [False, True], ids=["rows_major", "keys_major"])
def test_triton_ignores_cache_beyond_lengths_and_future_keys(keys_major, monkeypatch):
    """Cache rows past a sequence's length hold NaN (a reused or unwritten cache): the output is bit-for-bit
    the one of a clean cache, with T = 3 queries (causal: the last two keys seen by later queries only)
    and whole tiles up to the length (L = 64, 16-key tiles), so both the unmasked tiles and the masked
    remainder run; and keys a query may not see yet change nothing for it."""
    device = _triton_device()
    from kimi_linear.ops import latent_attention_triton as lt

    monkeypatch.setitem(lt.TILES, "keys_major_from", 0 if keys_major else 1 << 62)
    args = [a.to(device) for a in inputs(B=3, T=3, H=2, Dn=16, Dr=16, Dv=16, R=32, L=80)]
    lengths = torch.tensor([64, 48, 35], device=device)
    clean = lt.latent_attention_triton(*args, lengths=lengths, block_n=16, num_splits=2)
    poisoned = [a.clone() for a in args]
    for b, n in enumerate(lengths.tolist()):
        poisoned[2][b, n:] = float("nan")
        poisoned[3][b, n:] = float("nan")
    got = lt.latent_attention_triton(*poisoned, lengths=lengths, block_n=16, num_splits=2)
    assert torch.equal(got, clean)
    ref = expanded_attention_ref(*args, lengths=lengths)
    assert rel_rms(clean, ref) < (2e-3 if torch.cuda.is_available() else 1e-5)
    # the first query of row 0 sees keys < 62: a changed key 62 or 63 must not move it
    future = [a.clone() for a in args]
    future[2][0, 62:64] += 5.0
    moved = lt.latent_attention_triton(*future, lengths=lengths, block_n=16, num_splits=2)
    assert torch.equal(moved[0, 0], clean[0, 0]) and not torch.equal(moved[0, 2], clean[0, 2])


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["rows_major", "keys_major", "keys_major_tma"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_triton_kernel_full_geometry_gpu(cuda_device, dtype, kernel, monkeypatch):
    # the launch table's tiles at the benchmark geometry, both split kernels (the keys-major one also
    # through TMA); an fp32 cache (the fp32 model) must fit its tiles in shared memory too (64 bf16 keys
    # x 576 x 2 stages; fp32 takes 32, or 16 with the keys-major kernel's query rows). The second row's
    # cache past its length is NaN, which no kernel may read into its products.
    from kimi_linear.ops import latent_attention_triton as lt
    from kimi_linear.ops.latent_attention_triton import latent_attention_triton

    monkeypatch.setitem(lt.TILES, "keys_major_from", 1 << 62 if kernel == "rows_major" else 0)
    monkeypatch.setitem(lt.TILES, "keys_major_tma", int(kernel == "keys_major_tma"))

    args = [a.to(cuda_device) for a in inputs(B=2, T=1, H=32, Dn=128, Dr=64, Dv=128, R=512, L=5000, dtype=torch.float32)]
    lengths = torch.tensor([5000, 1234], device=cuda_device)
    ref = expanded_attention_ref(*args, lengths=lengths)
    args = [a.to(dtype) for a in args]
    args[2][1, 1234:] = float("nan")
    args[3][1, 1234:] = float("nan")
    out = latent_attention_triton(*args, lengths=lengths)
    assert torch.isfinite(out).all()
    assert rel_rms(out, ref) < (2e-2 if dtype == torch.bfloat16 else 2e-3)


@pytest.mark.gpu
def test_split_prefetch_and_one_pass_merge_gpu(cuda_device, monkeypatch):
    # The keys-major kernel's L2 prefetch before its PDL wait (TILES["prefetch_tiles"]) changes no bit; the
    # one-pass merge (the decode step's 132 splits) and the chunked one agree to the bf16 output's rounding.
    # Benchmark geometry, bf16, a second row whose cache past its length is NaN and whose length ends
    # inside a tile, a split and a prefetched range.
    from kimi_linear.ops import latent_attention_triton as lt

    monkeypatch.setitem(lt.TILES, "keys_major_from", 0)
    monkeypatch.setitem(lt.TILES, "keys_major_tma", 1)
    args = [a.to(cuda_device) for a in inputs(B=2, T=1, H=32, Dn=128, Dr=64, Dv=128, R=512, L=70000, dtype=torch.float32)]
    lengths = torch.tensor([70000, 12345], device=cuda_device)
    ref = expanded_attention_ref(*args, lengths=lengths)
    args = [a.bfloat16() for a in args]
    args[2][1, 12345:] = float("nan")
    args[3][1, 12345:] = float("nan")
    assert lt._prefetch_ok(args[2][:, :70000], args[3][:, :70000], 2 * 64)  # the launches below take it
    outs = {}
    for ahead in (0, 1, 2):
        for one_pass in (True, False):
            monkeypatch.setitem(lt.TILES, "prefetch_tiles", ahead)
            monkeypatch.setattr(lt, "MERGE_ONE_PASS", one_pass)
            outs[ahead, one_pass] = lt.latent_attention_triton(*args, lengths=lengths)
    for (ahead, one_pass), out in outs.items():
        assert torch.isfinite(out).all() and rel_rms(out, ref) < 2e-2, (ahead, one_pass)
        assert torch.equal(out, outs[0, one_pass]), (ahead, one_pass)
    assert rel_rms(outs[0, True], outs[0, False]) < 4e-3


@pytest.mark.parametrize("N,H,Dn,Dv,R", [(1, 4, 8, 6, 16), (5, 3, 16, 12, 20)], ids=["decode", "odd_sizes"])
def test_absorb_kernels_match_matmuls(N, H, Dn, Dv, R):
    """The absorbed query / output projections (Triton) against the batched matmuls they replace, with a
    strided query (a slice of the query projection's output, as in the layer) and non-power-of-two sizes."""
    device = _triton_device()
    from kimi_linear.ops.latent_absorb_triton import absorb_output, absorb_query
    from kimi_linear.ops.latent_attention import split_kv_b

    g = torch.Generator().manual_seed(3)
    w = (torch.randn(H * (Dn + Dv), R, generator=g) / R**0.5).to(device)
    q_full = torch.randn(N, H, Dn + 4, generator=g).to(device)
    q_nope = q_full[..., :Dn]  # row and head strides of the wider buffer
    ctx = torch.randn(N, H, R, generator=g).to(device)
    w_uk, w_uv = split_kv_b(w, H, Dn, Dv)
    tol = 2e-3 if torch.cuda.is_available() else 1e-6  # tf32 matmuls on GPU
    q_lat = absorb_query(q_nope, w, torch.float32)
    assert q_lat.shape == (N, H, R) and rel_rms(q_lat, torch.einsum("nhd,hdr->nhr", q_nope, w_uk)) < tol
    out = absorb_output(ctx, w, Dn, torch.float32)
    assert out.shape == (N, H, Dv) and rel_rms(out, torch.einsum("nhr,hvr->nhv", ctx, w_uv)) < tol


def test_absorb_kernels_reject_bad_input():
    from kimi_linear.ops.latent_absorb_triton import absorb_output, absorb_query

    w = torch.randn(4 * (8 + 6), 16)
    with pytest.raises(ValueError, match=r"q_nope must be \[N, H"):
        absorb_query(torch.randn(4, 8), w, torch.float32)
    with pytest.raises(ValueError, match="w_kv_b must be a contiguous"):
        absorb_query(torch.randn(1, 3, 8), w, torch.float32)  # 56 rows are not 3 heads' worth
    with pytest.raises(ValueError, match="rows per head"):
        absorb_query(torch.randn(1, 4, 14), w, torch.float32)
    with pytest.raises(ValueError, match="w_kv_b's width"):
        absorb_output(torch.randn(1, 4, 12), w, 8, torch.float32)
    with pytest.raises(ValueError, match="no value rows"):
        absorb_output(torch.randn(1, 4, 16), w, 14, torch.float32)
    with pytest.raises(ValueError, match="contiguous"):
        absorb_output(torch.randn(1, 4, 16), w.t().contiguous().t(), 8, torch.float32)


@pytest.mark.gpu
def test_absorb_kernels_benchmark_geometry_gpu(cuda_device):
    # bf16 at the benchmark's 32 heads x (128 + 128) x 512, against fp32 matmuls of the same bf16 values
    from kimi_linear.ops.latent_absorb_triton import absorb_output, absorb_query
    from kimi_linear.ops.latent_attention import split_kv_b

    H, Dn, Dv, R = 32, 128, 128, 512
    w = (torch.randn(H * (Dn + Dv), R, device=cuda_device) / R**0.5).bfloat16()
    q = torch.randn(2, H, Dn + 64, device=cuda_device).bfloat16()[..., :Dn]
    ctx = torch.randn(2, H, R, device=cuda_device).bfloat16()
    w_uk, w_uv = split_kv_b(w.float(), H, Dn, Dv)
    assert rel_rms(absorb_query(q, w, torch.bfloat16).float(), torch.einsum("nhd,hdr->nhr", q.float(), w_uk)) < 8e-3
    assert rel_rms(absorb_output(ctx, w, Dn, torch.bfloat16).float(),
                   torch.einsum("nhr,hvr->nhv", ctx.float(), w_uv)) < 8e-3


def test_scratch_allocator_kept_when_the_caller_set_one(monkeypatch):
    """The TMA kernel's descriptors need Triton's scratch allocator: ours is installed only where none
    was set, a caller's own stays."""
    pytest.importorskip("triton")
    import triton
    from triton.runtime import _allocation

    from kimi_linear.ops import latent_attention_triton as lt

    token = _allocation._allocator.set(_allocation.NullAllocator())
    try:
        lt._ensure_scratch_allocator()
        assert _allocation._allocator.get() is lt._scratch

        def mine(size, alignment, stream):
            return torch.empty(size, dtype=torch.int8)

        triton.set_allocator(mine)
        lt._ensure_scratch_allocator()
        assert _allocation._allocator.get() is mine
    finally:
        _allocation._allocator.reset(token)

