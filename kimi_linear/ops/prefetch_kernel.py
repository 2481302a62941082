"""The kernel of :mod:`kimi_linear.ops.prefetch` (imported lazily: needs Triton)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LANES = 128  # prefetch instructions a program issues at once: one per thread of its 4 warps


@triton.jit
def bulk_prefetch_l2(addr, size):
    """Ask the L2 for ``size`` bytes at ``addr`` (int64 byte addresses and int32 sizes, elementwise; 16-byte
    aligned, sizes multiples of 16; a size of 0 skips its element): ``cp.async.bulk.prefetch.L2.global``,
    no destination and nothing to wait for. sm_90 and later; not in the interpreter."""
    # the dummy output keeps the asm an op
    tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.ne.s32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
        "=r,l,r", [addr, size], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _prefetch_l2_kernel(base, nbytes, CHUNK: tl.constexpr, LANES: tl.constexpr):
    """Program ``i`` of ``n`` asks the L2 for pieces ``i*LANES .. i*LANES + LANES - 1``, then the same
    pieces ``n*LANES`` further on, and so on, of the ``CHUNK``-byte pieces of ``[base, base + nbytes)``:
    one bulk prefetch per piece and thread (``cp.async.bulk.prefetch.L2.global``: no destination, nothing
    to wait for). ``base`` and ``nbytes`` are 16-byte aligned (the instruction's rule, checked by
    :func:`kimi_linear.ops.prefetch.prefetch_plan`). sm_90 and later."""
    addr = base.to(tl.int64, bitcast=True)
    n_pieces = tl.cdiv(nbytes, CHUNK)
    lane = tl.arange(0, LANES)
    for first in range(tl.program_id(0) * LANES, n_pieces, tl.num_programs(0) * LANES):
        piece = (first + lane).to(tl.int64)
        size = tl.where(piece < n_pieces, tl.minimum(nbytes - piece * CHUNK, CHUNK), 0).to(tl.int32)
        bulk_prefetch_l2(addr + piece * CHUNK, size)  # size 0 past the end: skipped


def launch_prefetch(t: torch.Tensor, nbytes: int, programs: int, chunk: int) -> None:
    """One launch on the current stream (arguments from :func:`kimi_linear.ops.prefetch.prefetch_plan`)."""
    _prefetch_l2_kernel[(programs,)](t, nbytes, CHUNK=chunk, LANES=LANES, num_warps=LANES // 32)
