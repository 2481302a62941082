"""The chunk table of the chunked KDA kernels: layout, and the per-(offsets, device) cache."""

from __future__ import annotations

import torch

from kimi_linear.ops.kda.chunk_common import CHUNK, build_chunk_table


def test_chunk_table_layout_with_empty_and_long_sequences():
    offsets = [0, 0, 1, 1 + 2 * CHUNK + 5, 1 + 2 * CHUNK + 5]  # empty, one token, 3 chunks, empty
    t = build_chunk_table(offsets, torch.device("cpu"))
    assert (t.N, t.NC) == (4, 4)
    assert t.chunk_start.tolist() == [0, 1, 1 + CHUNK, 1 + 2 * CHUNK]
    assert t.chunk_len.tolist() == [1, CHUNK, CHUNK, 5]
    assert t.chunk_first.tolist() == [0, 0, 1, 4, 4]
    assert t.seq_start.tolist() == offsets
    assert all(x.dtype == torch.int32 for x in (t.chunk_start, t.chunk_len, t.chunk_first, t.seq_start))


def test_chunk_table_is_cached_per_offsets():
    a = build_chunk_table([0, 100, 300], torch.device("cpu"))
    assert build_chunk_table([0, 100, 300], torch.device("cpu")) is a
    b = build_chunk_table([0, 100, 301], torch.device("cpu"))
    assert b is not a and b.chunk_len.tolist()[-1] == 201 - 3 * CHUNK


def test_chunk_table_of_no_tokens():
    t = build_chunk_table([0, 0], torch.device("cpu"))
    assert (t.N, t.NC) == (1, 0)
    assert t.chunk_first.tolist() == [0, 0]


def test_full_means_chunk_c_starts_at_64c():
    """``ChunkTable.full`` (kernels then place chunks from their index): every chunk holds 64 tokens and
    chunk c starts at token 64 c -- sequences of whole chunks (empty ones included) from token 0."""
    from kimi_linear.ops.kda.chunk_common import _build_chunk_table

    cpu = torch.device("cpu")
    for offsets, full in (([0, 64, 192], True), ([0, 0, 64, 64, 128], True), ([0, 64, 150], False),
                          ([0, 100, 164], False), ([64, 128], False)):
        table = _build_chunk_table(offsets, cpu)
        assert table.full == full, offsets
        if full:
            assert table.chunk_start.tolist() == [64 * c for c in range(table.NC)]
            assert table.chunk_len.tolist() == [64] * table.NC
