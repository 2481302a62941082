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
