"""The split-tile L2 prefetch of the absorbed-MLA decode kernels (``ops/latent_prefetch_kernel.py``): its
address arithmetic in Triton's interpreter (the prefetch instruction itself runs on Hopper only; that it is
issued before the PDL wait is checked in the sm_90a PTX by tests/bench/test_kernel_resources.py)."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from kimi_linear.ops.latent_prefetch_kernel import split_tile_pieces  # noqa: E402


@triton.jit
def _pieces_kernel(c_ptr, kr_ptr, len_ptr, addr_out, size_out, i_s, i_b, keys_per_split, stride_cb, stride_krb,
                   R: tl.constexpr, DR: tl.constexpr, BLOCK_N: tl.constexpr, TILES: tl.constexpr, ELT: tl.constexpr):
    addr, size = split_tile_pieces(c_ptr, kr_ptr, len_ptr, i_s, i_b, keys_per_split, stride_cb, stride_krb,
                                   R, DR, BLOCK_N, TILES, ELT)
    o = tl.arange(0, 128)
    tl.store(addr_out + o, addr)
    tl.store(size_out + o, size)


@pytest.mark.parametrize("tiles", [1, 2])
def test_split_tile_prefetch_covers_exactly_the_tiles(tiles):
    """For every split of a batch of two rows -- whole tiles, a split cut by its row's length, splits past
    it -- the 128 pieces cover exactly the latent and shared key rows of the first ``tiles`` tiles (64
    lanes each, back to back, nothing past the split's end), 16-byte aligned pieces of 16-byte multiples."""
    from kimi_linear.backends import triton_interpret

    if not triton_interpret():
        pytest.skip("host byte addresses: the interpreter")
    # 3 tiles per split; a tile of either tensor is a multiple of 64 lanes x 16 bytes (the host rule, _prefetch_ok)
    B, L, R, DR, block_n, kps = 2, 400, 64, 32, 16, 48
    latent = torch.zeros(B, L, R, dtype=torch.bfloat16)
    k_rope = torch.zeros(B, L, DR, dtype=torch.bfloat16)
    lengths = torch.tensor([300, 70])
    covered = 0
    for b in range(B):
        for s in range(triton.cdiv(L, kps)):
            addr, size = torch.zeros(128, dtype=torch.int64), torch.zeros(128, dtype=torch.int32)
            _pieces_kernel[(1,)](latent, k_rope, lengths, addr, size, s, b, kps, latent.stride(0), k_rope.stride(0),
                                 R=R, DR=DR, BLOCK_N=block_n, TILES=tiles, ELT=2)
            lo = s * kps
            hi = max(lo, min(s * kps + kps, int(lengths[b]), lo + tiles * block_n))
            for lanes, t, width in ((slice(0, 64), latent, R), (slice(64, 128), k_rope, DR)):
                got = sorted((int(a), int(n)) for a, n in zip(addr[lanes], size[lanes]) if n > 0)
                assert all(a % 16 == 0 and n % 16 == 0 for a, n in got), (b, s, got[:3])
                if hi == lo:
                    assert got == [], (b, s)
                    continue
                base = t.data_ptr() + (b * t.stride(0) + lo * width) * t.element_size()
                assert got[0][0] == base, (b, s)
                assert got[-1][0] + got[-1][1] == base + (hi - lo) * width * t.element_size(), (b, s)
                assert all(got[i][0] + got[i][1] == got[i + 1][0] for i in range(len(got) - 1)), (b, s)
                covered += 1
    assert covered >= 8  # splits with tiles in them were checked, not only empty ones
