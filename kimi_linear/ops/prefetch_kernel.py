"""The kernel of :mod:`kimi_linear.ops.prefetch` (imported lazily: needs Triton)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LANES = 128  # prefetch instructions a program issues at once: one per thread of its 4 warps


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
        # a size of 0 (past the end) skips the instruction; the dummy output keeps the asm an op
        tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.s32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
            "=r,l,r", [addr + piece * CHUNK, size], dtype=tl.int32, is_pure=False, pack=1)


def launch_prefetch(t: torch.Tensor, nbytes: int, programs: int, chunk: int) -> None:
    """One launch on the current stream (arguments from :func:`kimi_linear.ops.prefetch.prefetch_plan`)."""
    _prefetch_l2_kernel[(programs,)](t, nbytes, CHUNK=chunk, LANES=LANES, num_warps=LANES // 32)


@triton.jit
def _prefetch_segments_l2_kernel(base_a, base_b, row_bytes_a, row_bytes_b, batch_bytes_a, batch_bytes_b, log_ptr, log_stride,
                                 n_rows, seg_rows, rows, n_segs, n_batch,
                                 CHUNK: tl.constexpr, LANES: tl.constexpr, LOG: tl.constexpr):
    """The leading ``rows`` rows of every segment of two ``[n_batch, n_rows, *]`` tensors (grid dimension
    1 picks ``a`` or ``b``): segment ``s`` of batch row ``b`` starts at row ``s * seg_rows`` and ends at
    ``n_rows`` at the latest; its bytes go in ``CHUNK``-byte pieces, one bulk L2 prefetch per piece and
    thread, the programs of dimension 0 taking ``LANES`` pieces at a time in turn. Rows are contiguous
    within a batch row (row stride = row bytes, multiples of 16, as are the bases and batch strides).
    LOG: write each piece's ``(address, size)`` to ``log_ptr [2, log_stride, 2]`` int64 instead of
    prefetching (a test of the address arithmetic that runs in Triton's interpreter)."""
    which = tl.program_id(1)
    base = tl.where(which == 0, base_a.to(tl.int64, bitcast=True), base_b.to(tl.int64, bitcast=True))
    row_bytes = tl.where(which == 0, row_bytes_a, row_bytes_b).to(tl.int64)
    batch_bytes = tl.where(which == 0, batch_bytes_a, batch_bytes_b).to(tl.int64)
    per_seg = tl.cdiv(rows * row_bytes, CHUNK)  # pieces of a whole segment
    n_pieces = n_batch * n_segs * per_seg
    lane = tl.arange(0, LANES)
    for first in range(tl.program_id(0) * LANES, n_pieces, tl.num_programs(0) * LANES):
        piece = first + lane.to(tl.int64)
        seg = piece // per_seg
        start = (seg % n_segs) * seg_rows  # first row of the segment
        seg_bytes = (tl.minimum(start + rows, n_rows) - start) * row_bytes  # <= 0 past the rows
        off = (piece % per_seg) * CHUNK
        size = tl.where(piece < n_pieces, tl.minimum(tl.maximum(seg_bytes - off, 0), CHUNK), 0).to(tl.int32)
        addr = base + (seg // n_segs) * batch_bytes + start * row_bytes + off
        if LOG:
            p_log = log_ptr + (which * log_stride + piece) * 2
            tl.store(p_log, addr, mask=piece < n_pieces)
            tl.store(p_log + 1, size.to(tl.int64), mask=piece < n_pieces)
        else:
            tl.inline_asm_elementwise(
                "{ .reg .pred p; setp.ne.s32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
                "=r,l,r", [addr, size], dtype=tl.int32, is_pure=False, pack=1)


def launch_prefetch_segments(a: torch.Tensor, b: torch.Tensor, seg_rows: int, rows: int, n_segs: int,
                             programs: int, chunk: int, log: torch.Tensor | None = None) -> None:
    """One launch on the current stream (arguments checked by :func:`kimi_linear.ops.prefetch.prefetch_segments_l2_`)."""
    B, L = a.shape[0], a.shape[1]
    _prefetch_segments_l2_kernel[(programs, 2)](
        a, b, a.stride(1) * a.element_size(), b.stride(1) * b.element_size(),
        a.stride(0) * a.element_size(), b.stride(0) * b.element_size(), a if log is None else log,
        0 if log is None else log.shape[1],
        L, seg_rows, rows, n_segs, B, CHUNK=chunk, LANES=LANES, LOG=log is not None, num_warps=LANES // 32)
