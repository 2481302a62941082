"""Tokenizers round-trip and are rebuilt from what a checkpoint saves."""

from __future__ import annotations

import base64

import pytest

from kimi_linear.train.tokenizers import ByteTokenizer, TiktokenBPE, load_tokenizer, read_bpe_ranks

TEXT = "def f(x):\n    return x ** 2  # carré, 平方, emoji 🙂\n"


def test_byte_round_trip_and_save(tmp_path):
    tok = ByteTokenizer()
    ids = tok.encode(TEXT)
    assert max(ids) < 256 and tok.decode(ids) == TEXT
    assert tok.decode(ids + [tok.eos_id, tok.pad_id]) == TEXT
    tok.save(tmp_path)
    assert isinstance(load_tokenizer(tmp_path), ByteTokenizer)
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)


def _rank_file(tmp_path, merges=(b"de", b"def", b"  ", b"    ", b"re", b"ret", b"retu", b"retur", b"return")):
    lines = [base64.b64encode(bytes([i])).decode() + f" {i}" for i in range(256)]
    lines += [base64.b64encode(m).decode() + f" {256 + j}" for j, m in enumerate(merges)]
    p = tmp_path / "ranks.tiktoken"
    p.write_text("\n".join(lines) + "\n")
    return p


def test_tiktoken_bpe_merges_and_round_trips(tmp_path):
    tok = TiktokenBPE(_rank_file(tmp_path))
    ids = tok.encode(TEXT)
    assert tok.decode(ids) == TEXT
    assert tok.ranks[b"def"] in ids and tok.ranks[b"return"] in ids
    assert len(ids) < len(TEXT.encode())
    assert tok.eos_id == 266 and tok.vocab_size == 268
    out = tmp_path / "ckpt"
    tok.save(out)
    again = load_tokenizer(out)
    assert isinstance(again, TiktokenBPE) and again.encode(TEXT) == ids


def test_hf_tokenizer_json_round_trip(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    t = tokenizers.Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator([TEXT * 5], trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path = tmp_path / "tokenizer.json"
    t.save(str(path))
    tok = load_tokenizer(path)
    assert tok.kind == "hf" and tok.decode(tok.encode(TEXT)) == TEXT
    assert tok.eos_id == t.token_to_id("<|endoftext|>")
    tok.save(tmp_path / "ckpt")
    assert load_tokenizer(tmp_path / "ckpt").encode(TEXT) == tok.encode(TEXT)


def test_bad_tokenizer_inputs(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "missing.json")
    bad = tmp_path / "bad.tiktoken"
    bad.write_text("not-base64!! x\n")
    with pytest.raises(ValueError, match="bad.tiktoken:1"):
        read_bpe_ranks(bad)
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no"):
        load_tokenizer(tmp_path / "emptydir")
