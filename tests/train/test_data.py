"""Corpus listing, split by file, packing, varlen labels, deterministic and resumable shuffling."""

from __future__ import annotations

import json
import math

import pytest
import torch

from kimi_linear.train.corpus import iter_documents, list_files, split_files, stdlib_files
from kimi_linear.train.data import PackedStream, collate, unigram_entropy, validation_rows
from kimi_linear.train.tokenizers import ByteTokenizer

TOK = ByteTokenizer()


def _files(tmp_path, n=20):
    d = tmp_path / "c"
    d.mkdir(exist_ok=True)
    for i in range(n):
        (d / f"f{i:02d}.txt").write_text(f"<{i}>" + "abc" * (i + 3))
    with open(d / "docs.jsonl", "w") as f:
        for j in range(5):
            f.write(json.dumps({"text": f"json doc {j}"}) + "\n")
    return list_files([str(d)])


def _stream(files, **kw):
    return PackedStream(files, TOK.encode, TOK.eos_id, 16, **{"seed": 3, "shuffle_buffer": 7, **kw})


def test_packing_covers_every_document_once_per_epoch(tmp_path):
    files = _files(tmp_path)
    s = _stream(files, shuffle=False, epochs=1)
    stream = [t for row in s for t in row.tokens]
    expected = []
    for f in files:
        for doc in iter_documents(f):
            expected += TOK.encode(doc) + [TOK.eos_id]
    assert stream[: len(expected)] == expected
    assert all(t == TOK.eos_id for t in stream[len(expected):])  # EOS padding of the last row


def test_row_starts_mark_documents(tmp_path):
    for row in _stream(_files(tmp_path), epochs=1):
        for s in row.starts[1:]:
            assert row.tokens[s - 1] == TOK.eos_id  # every start after 0 follows a separator
        for i, t in enumerate(row.tokens[:-1]):
            if t == TOK.eos_id and row.tokens[i + 1] != TOK.eos_id:  # (trailing EOS = padding)
                assert i + 1 in row.starts


def test_varlen_collate_flattens_and_masks_boundaries(tmp_path):
    rows = [r for _, r in zip(range(6), _stream(_files(tmp_path)))]
    b = collate(rows, varlen=True)
    T = 16
    assert b["input_ids"].shape == (1, 6 * T)
    cu = b["cu_seqlens"].tolist()
    assert cu[0] == 0 and cu[-1] == 6 * T and cu == sorted(set(cu))
    assert all(r * T in cu for r in range(6))
    masked = (b["labels"][0] == -100).nonzero().flatten().tolist()
    assert masked == cu[1:-1]
    plain = collate(rows)
    assert plain["input_ids"].shape == (6, T) and "cu_seqlens" not in plain
    assert torch.equal(plain["labels"], plain["input_ids"])


def test_shuffle_deterministic_and_seed_dependent(tmp_path):
    files = _files(tmp_path)
    a = [r.tokens for _, r in zip(range(40), _stream(files))]
    b = [r.tokens for _, r in zip(range(40), _stream(files))]
    c = [r.tokens for _, r in zip(range(40), _stream(files, seed=4))]
    assert a == b and a != c


def test_state_dict_resumes_exactly(tmp_path):
    files = _files(tmp_path)
    s = _stream(files)
    for _ in range(23):
        s.next_row()
    st = json.loads(json.dumps(s.state_dict()))  # plain data, survives serialisation
    rest = [s.next_row().tokens for _ in range(60)]
    s2 = _stream(files)
    s2.load_state_dict(st)
    assert [s2.next_row().tokens for _ in range(60)] == rest
    with pytest.raises(ValueError, match="training files"):
        _stream(files[:-1]).load_state_dict(st)


def test_split_by_file_never_mixes_validation_into_training(tmp_path):
    files = _files(tmp_path)
    train, val = split_files(files, 0.25, seed=0)
    assert val and train
    assert {f.rel for f in train}.isdisjoint({f.rel for f in val})
    assert sorted(f.rel for f in train + val) == sorted(f.rel for f in files)
    assert split_files(list(reversed(files)), 0.25, 0)[1] == val  # independent of listing order
    val_text = {d for f in val for d in iter_documents(f)}
    # each file starts with a unique marker "<i>": none of the held-out ones may reach training rows
    markers = {d[: d.index(">") + 1] for d in val_text if d.startswith("<")}
    seen = TOK.decode([t for _, r in zip(range(200), _stream(train)) for t in r.tokens])
    assert markers and not any(m in seen for m in markers)
    val_seen = TOK.decode([t for r in validation_rows(val, TOK.encode, TOK.eos_id, 16, 50) for t in r.tokens])
    assert all(m in val_seen for m in markers)


def test_stdlib_corpus_is_deterministic_and_large():
    a, b = stdlib_files(), stdlib_files()
    assert [f.rel for f in a] == [f.rel for f in b] == sorted(f.rel for f in a)
    assert not any("site-packages" in f.rel for f in a)
    assert sum(f.path.stat().st_size for f in a) > 5_000_000
    train, val = split_files(list_files("stdlib"), 0.02, 0)
    assert len(val) >= 5 and len(train) > 10 * len(val)


def test_missing_and_bad_inputs_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        list_files([str(tmp_path / "missing")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no text files"):
        list_files([str(tmp_path / "empty")])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"txt": "x"}\n')
    with pytest.raises(ValueError, match="'text'"):
        list(iter_documents(list_files([str(bad)])[0]))
    with pytest.raises(ValueError, match="at least 2 files"):
        split_files(list_files([str(bad)]), 0.1)


def test_unigram_entropy(tmp_path):
    p = tmp_path / "u.txt"
    p.write_text("ab" * 1000)
    # counts a: 1000, b: 1000, EOS: 1 (one document) -> the entropy of that distribution, by hand
    h = unigram_entropy(list_files([str(p)]), TOK.encode, TOK.eos_id, TOK.vocab_size)
    n = 2001
    expected = -2 * (1000 / n) * math.log(1000 / n) - (1 / n) * math.log(1 / n)
    assert abs(h - expected) < 1e-12, (h, expected)
