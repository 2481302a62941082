"""The in-kernel half of :mod:`kimi_linear.ops.prefetch` (imported lazily: needs Triton)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def prefetch_l2(base, nbytes, index, count, CHUNK: tl.constexpr, LANES: tl.constexpr):
    """Program ``index`` of ``count`` asks the L2 for its share of the bytes ``[base, base + nbytes)``.

    The bytes are cut into ``CHUNK``-byte pieces; the programs take ``LANES`` consecutive pieces in turn,
    one bulk prefetch per piece and thread (``cp.async.bulk.prefetch.L2.global``: asynchronous, no
    destination, nothing to wait for). ``base`` and ``nbytes`` are 16-byte aligned (the instruction's
    rule, checked by :func:`kimi_linear.ops.prefetch.prefetch_plan`). sm_90 and later only; callers compile
    this out elsewhere.
    """
    addr = base.to(tl.int64, bitcast=True)
    n_pieces = tl.cdiv(nbytes, CHUNK)
    lane = tl.arange(0, LANES)
    for first in range(index * LANES, n_pieces, count * LANES):
        piece = (first + lane).to(tl.int64)
        size = tl.where(piece < n_pieces, tl.minimum(nbytes - piece * CHUNK, CHUNK), 0).to(tl.int32)
        # a size of 0 (past the end) skips the instruction; the dummy output keeps the asm an op
        tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.s32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
            "=r,l,r", [addr + piece * CHUNK, size], dtype=tl.int32, is_pure=False, pack=1)
