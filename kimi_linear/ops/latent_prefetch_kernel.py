"""L2 prefetch of a split's first latent-cache tiles, for the absorbed-MLA decode kernels (Hopper).

The keys-major split kernel, placed early by PDL (:mod:`kimi_linear.ops.pdl`) while the query absorption
still runs, has nothing of its own to do before its wait; it asks the L2 for the tiles it will read first.
A prefetch has no destination, so it is safe before the wait: it cannot see a half-written value, only move
bytes into L2 earlier (docs/decode.md, session 29). The address arithmetic is a function of its own so the
interpreter can test it (tests/ops/test_latent_prefetch.py). Imported lazily (needs Triton).
"""

from __future__ import annotations

import triton
import triton.language as tl

from kimi_linear.ops.prefetch_kernel import bulk_prefetch_l2


@triton.jit
def split_tile_pieces(c_ptr, kr_ptr, len_ptr, i_s, i_b, keys_per_split, stride_cb, stride_krb,
                      R: tl.constexpr, DR: tl.constexpr, BLOCK_N: tl.constexpr, TILES: tl.constexpr,
                      ELT: tl.constexpr):
    """``(addr, size)`` of 128 lanes (int64 byte addresses, int32 sizes, 0 for an empty piece) covering the
    first ``TILES`` key tiles of split ``i_s`` of batch row ``i_b``: latent rows ``[lo, hi)`` with
    ``lo = i_s keys_per_split``, ``hi`` the tiles' end or the split's (its length bound), and the same
    rows of the shared key part. Each range is contiguous (rows ``R`` / ``DR`` elements of ``ELT`` bytes
    apart, batch rows ``stride_cb`` / ``stride_krb`` elements: checked on the host, with 16-byte
    alignment); lanes 0-63 cut the latent range into equal pieces, 64-127 the key part's (16-byte
    multiples: host-checked)."""
    HALF: tl.constexpr = 64
    C_PIECE: tl.constexpr = TILES * BLOCK_N * R * ELT // HALF
    KR_PIECE: tl.constexpr = TILES * BLOCK_N * DR * ELT // HALF
    i_s = i_s.to(tl.int64)
    i_b = i_b.to(tl.int64)
    lo = i_s * keys_per_split
    end = tl.minimum(lo + keys_per_split, tl.load(len_ptr + i_b).to(tl.int64))
    rows = tl.maximum(tl.minimum(end, lo + TILES * BLOCK_N) - lo, 0)
    lane = tl.arange(0, 2 * HALF)
    is_c = lane < HALF
    k = tl.where(is_c, lane, lane - HALF).to(tl.int64)
    c0 = c_ptr.to(tl.int64, bitcast=True) + (i_b * stride_cb + lo * R) * ELT
    kr0 = kr_ptr.to(tl.int64, bitcast=True) + (i_b * stride_krb + lo * DR) * ELT
    piece = tl.where(is_c, C_PIECE, KR_PIECE).to(tl.int64)
    total = rows * tl.where(is_c, R * ELT, DR * ELT).to(tl.int64)
    size = tl.minimum(tl.maximum(total - k * piece, 0), piece).to(tl.int32)
    return tl.where(is_c, c0, kr0) + k * piece, size


@triton.jit
def prefetch_split_tiles(c_ptr, kr_ptr, len_ptr, i_s, i_b, keys_per_split, stride_cb, stride_krb,
                         R: tl.constexpr, DR: tl.constexpr, BLOCK_N: tl.constexpr, TILES: tl.constexpr,
                         ELT: tl.constexpr):
    """Ask the L2 for the pieces of :func:`split_tile_pieces` (same arguments): one bulk prefetch per lane."""
    addr, size = split_tile_pieces(c_ptr, kr_ptr, len_ptr, i_s, i_b, keys_per_split, stride_cb, stride_krb,
                                   R, DR, BLOCK_N, TILES, ELT)
    bulk_prefetch_l2(addr, size)
