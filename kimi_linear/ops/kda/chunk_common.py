"""Shared pieces of the chunked KDA kernels: chunk tables and launch constants (needs no Triton).

Every kernel sees the input as one packed stream of ``Ttot = B * T`` tokens (a padded batch is a
varlen pack with ``cu_seqlens = [0, T, 2T, ...]``). A *chunk* is up to ``C = 64`` consecutive tokens
of one sequence; chunks never cross sequences. Per-chunk kernels run one program per (chunk, value
head); state kernels run one program per (sequence, value head, V-tile) and walk the sequence's
chunks ``chunk_first[n] .. chunk_first[n+1]-1`` in order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

CHUNK = 64  # tokens per chunk (docs/kda.md, step 2)
SUB = 16  # tokens per sub-chunk: the exact-decay unit (docs/kda.md, step 3)
# exp(-800) is exactly 0 in fp32/fp64; flooring the gate there changes no result and keeps chunk
# cumsums small enough that differences of later small gates stay precise (reference.GATE_FLOOR).
GATE_FLOOR = -800.0


@dataclass(frozen=True)
class ChunkTable:
    """Where each chunk lives in the packed token stream.

    | field        | shape     | meaning                                         |
    |--------------|-----------|-------------------------------------------------|
    | chunk_start  | ``[NC]``  | first token (packed index) of chunk c           |
    | chunk_len    | ``[NC]``  | tokens in chunk c (1..64)                        |
    | chunk_first  | ``[N+1]`` | index of the first chunk of sequence n          |
    | seq_start    | ``[N+1]`` | first token of sequence n (the offsets)         |
    """

    chunk_start: torch.Tensor
    chunk_len: torch.Tensor
    chunk_first: torch.Tensor
    seq_start: torch.Tensor
    NC: int
    N: int


def build_chunk_table(offsets: list[int], device: torch.device) -> ChunkTable:
    """Chunk table for sequences ``[offsets[n], offsets[n+1])`` of the packed stream."""
    starts: list[int] = []
    lens: list[int] = []
    first = [0]
    for n in range(len(offsets) - 1):
        s, e = offsets[n], offsets[n + 1]
        for c0 in range(s, e, CHUNK):
            starts.append(c0)
            lens.append(min(CHUNK, e - c0))
        first.append(len(starts))
    as_t = lambda x: torch.tensor(x if x else [0], dtype=torch.int32, device=device)  # noqa: E731
    return ChunkTable(as_t(starts), as_t(lens), as_t(first), as_t(list(offsets)), NC=len(starts), N=len(offsets) - 1)


def pow2(x: int, floor: int = 16) -> int:
    """Smallest power of two >= max(x, floor) (Triton block sizes; tl.dot needs >= 16)."""
    p = floor
    while p < x:
        p *= 2
    return p


# Tests set this to True: every buffer the kernels write (outputs and intermediates) then starts
# as NaN, so an element a kernel forgets to write, or a read of one, cannot pass unnoticed.
POISON = False


def alloc(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty`` for kernel buffers, NaN-filled when :data:`POISON` is set."""
    t = torch.empty(shape, dtype=dtype, device=device)
    if POISON:
        t.fill_(float("nan"))
    return t
