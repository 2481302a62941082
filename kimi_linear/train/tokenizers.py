"""Tokenizers for training: bytes (no files), HF ``tokenizer.json``, tiktoken-style BPE rank files.

All three share one small interface (:class:`Tokenizer`): ``encode``, ``decode``, ``vocab_size``,
``bos_id`` / ``eos_id`` / ``pad_id`` and ``save(directory)``. ``save`` writes the files a checkpoint
needs to rebuild the same tokenizer (``load_tokenizer(checkpoint_dir)`` reads them back):

| kind      | files written into the checkpoint                                      |
|-----------|------------------------------------------------------------------------|
| byte      | ``kimi_linear_tokenizer.json`` (``{"kind": "byte"}``)                   |
| hf        | ``tokenizer.json`` (copied) + ``kimi_linear_tokenizer.json``           |
| tiktoken  | ``tiktoken.model`` (copied rank file) + ``kimi_linear_tokenizer.json`` |

The tiktoken loader is our own (the ``tiktoken`` package is not needed): a rank file holds one
``<base64 bytes> <rank>`` pair per line; text is split by a pre-tokenizer regex and each piece is
merged byte-pair by byte-pair, always merging the adjacent pair whose concatenation has the lowest
rank, until no adjacent pair is in the vocabulary.
"""

from __future__ import annotations

import base64
import functools
import json
import os
import shutil
from pathlib import Path
from typing import Protocol

META_FILE = "kimi_linear_tokenizer.json"

# The cl100k-style split pattern; needs the ``regex`` module (``\p{..}`` classes), which ships
# with transformers. Without it we fall back to a coarser ``re`` pattern (documented in errors).
DEFAULT_BPE_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
_FALLBACK_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[^\r\n\w]?[^\W\d_]+|\d{1,3}| ?[^\s\w]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""


class Tokenizer(Protocol):
    kind: str
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def save(self, directory: str | os.PathLike) -> None: ...


def _write_meta(directory: str | os.PathLike, meta: dict) -> None:
    Path(directory).mkdir(parents=True, exist_ok=True)
    with open(Path(directory) / META_FILE, "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, then three specials: ``<|bos|>`` 256, ``<|eos|>`` 257, ``<|pad|>`` 258.

    Decoding drops special ids and replaces invalid UTF-8 (a model may emit a partial character).
    """

    kind = "byte"
    vocab_size = 259
    bos_id = 256
    eos_id = 257
    pad_id = 258

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def save(self, directory: str | os.PathLike) -> None:
        _write_meta(directory, {"kind": "byte"})


class HFTokenizer:
    """A local HF ``tokenizer.json`` (the ``tokenizers`` package, no download)."""

    kind = "hf"

    def __init__(self, path: str | os.PathLike, *, eos_token: str | None = None, bos_token: str | None = None):
        try:
            from tokenizers import Tokenizer as _HFTok
        except ImportError as exc:  # optional extra
            raise ImportError("HF tokenizer files need the `tokenizers` package: pip install 'kimi-linear[hf]'") from exc
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"tokenizer.json not found: {self.path}")
        self._tok = _HFTok.from_file(str(self.path))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.eos_id = self._find_special(eos_token, ("<|endoftext|>", "</s>", "<|eos|>", "[EOS]", "<eos>", "[SEP]"))
        self.bos_id = self._find_special(bos_token, ("<|startoftext|>", "<s>", "<|bos|>", "[BOS]", "<bos>", "[CLS]"))
        pad = self._tok.token_to_id("<pad>") if self._tok.token_to_id("<pad>") is not None else None
        self.pad_id = pad if pad is not None else self.eos_id
        self.eos_token, self.bos_token = eos_token, bos_token

    def _find_special(self, explicit: str | None, candidates: tuple[str, ...]) -> int:
        names = (explicit,) if explicit else candidates
        for name in names:
            tid = self._tok.token_to_id(name)
            if tid is not None:
                return tid
        if explicit:
            raise ValueError(f"special token {explicit!r} is not in {self.path}")
        # No known special: use the last id; documents still get a separator the model can learn.
        return self.vocab_size - 1

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def save(self, directory: str | os.PathLike) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        target = Path(directory) / "tokenizer.json"
        if target.resolve() != self.path.resolve():
            shutil.copyfile(self.path, target)
        _write_meta(directory, {"kind": "hf", "file": "tokenizer.json", "eos_token": self.eos_token,
                                "bos_token": self.bos_token})


def read_bpe_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """Parse a tiktoken rank file: one ``<base64 token> <rank>`` per non-empty line."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            parts = line.split()
            if len(parts) != 2:
                raise ValueError(f"{path}:{lineno}: expected '<base64 token> <rank>', got {line[:80]!r}")
            try:
                ranks[base64.b64decode(parts[0], validate=True)] = int(parts[1])
            except (ValueError, base64.binascii.Error) as exc:
                raise ValueError(f"{path}:{lineno}: bad base64 token or rank: {line[:80]!r}") from exc
    if not ranks:
        raise ValueError(f"{path}: no BPE ranks found (empty file?)")
    return ranks


class TiktokenBPE:
    """Byte-level BPE from a tiktoken rank file, implemented here (no ``tiktoken`` needed).

    Special tokens ``<|bos|>``, ``<|eos|>``, ``<|pad|>`` take the ids after the largest rank unless
    ``specials`` names others. Encoding needs every single byte to have a rank (true for real
    tiktoken files); a piece containing an unranked byte raises ValueError.
    """

    kind = "tiktoken"

    def __init__(self, path: str | os.PathLike, *, pattern: str | None = None, specials: dict[str, int] | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"tiktoken BPE rank file not found: {self.path}")
        self.ranks = read_bpe_ranks(self.path)
        self.decoder = {r: b for b, r in self.ranks.items()}
        top = max(self.ranks.values()) + 1
        self.specials = dict(specials) if specials else {"<|bos|>": top, "<|eos|>": top + 1, "<|pad|>": top + 2}
        self.special_decoder = {i: s for s, i in self.specials.items()}
        self.bos_id = self.specials.get("<|bos|>", top)
        self.eos_id = self.specials.get("<|eos|>", top + 1)
        self.pad_id = self.specials.get("<|pad|>", self.eos_id)
        self.vocab_size = max([top - 1, *self.specials.values()]) + 1
        self.pattern = pattern or DEFAULT_BPE_PATTERN
        try:
            import regex

            self._split = regex.compile(self.pattern).findall
        except ImportError:
            import re

            if pattern is not None:
                raise ImportError("a custom BPE pattern needs the `regex` package (pip install regex)") from None
            self._split = re.compile(_FALLBACK_PATTERN).findall
        self._merge_piece = functools.lru_cache(maxsize=65536)(self._bpe)

    def _bpe(self, piece: bytes) -> tuple[int, ...]:
        if piece in self.ranks:
            return (self.ranks[piece],)
        parts = [piece[i : i + 1] for i in range(len(piece))]
        for p in parts:
            if p not in self.ranks:
                raise ValueError(f"byte {p!r} has no rank in {self.path}; a byte-level BPE file ranks all 256 bytes")
        while len(parts) > 1:
            best, best_i = None, -1
            for i in range(len(parts) - 1):
                r = self.ranks.get(parts[i] + parts[i + 1])
                if r is not None and (best is None or r < best):
                    best, best_i = r, i
            if best is None:
                break
            parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]
        return tuple(self.ranks[p] for p in parts)

    def encode(self, text: str) -> list[int]:
        out: list[int] = []
        for piece in self._split(text):
            out.extend(self._merge_piece(piece.encode("utf-8")))
        return out

    def decode(self, ids: list[int]) -> str:
        data = b"".join(self.decoder.get(i, b"") for i in ids if i not in self.special_decoder)
        return data.decode("utf-8", errors="replace")

    def save(self, directory: str | os.PathLike) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        target = Path(directory) / "tiktoken.model"
        if target.resolve() != self.path.resolve():
            shutil.copyfile(self.path, target)
        _write_meta(directory, {"kind": "tiktoken", "file": "tiktoken.model", "pattern": self.pattern,
                                "specials": self.specials})


def load_tokenizer(spec: str | os.PathLike) -> Tokenizer:
    """Build a tokenizer from ``"byte"``, a ``tokenizer.json``, a tiktoken rank file, or a directory.

    A directory is a checkpoint written by :meth:`Tokenizer.save` (its ``kimi_linear_tokenizer.json``
    says which), or a folder holding ``tokenizer.json`` or ``tiktoken.model``.

    Raises:
        FileNotFoundError: the path does not exist or the directory holds no tokenizer.
        ValueError: the file is not a tokenizer we can read.
    """
    if str(spec) == "byte":
        return ByteTokenizer()
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"tokenizer: {spec!r} is neither 'byte' nor an existing file or directory")
    if path.is_dir():
        meta_path = path / META_FILE
        if meta_path.is_file():
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            kind = meta.get("kind")
            if kind == "byte":
                return ByteTokenizer()
            if kind == "hf":
                return HFTokenizer(path / meta.get("file", "tokenizer.json"), eos_token=meta.get("eos_token"),
                                   bos_token=meta.get("bos_token"))
            if kind == "tiktoken":
                return TiktokenBPE(path / meta.get("file", "tiktoken.model"), pattern=meta.get("pattern"),
                                   specials=meta.get("specials"))
            raise ValueError(f"{meta_path}: unknown tokenizer kind {kind!r} (expected byte, hf or tiktoken)")
        if (path / "tokenizer.json").is_file():
            return HFTokenizer(path / "tokenizer.json")
        if (path / "tiktoken.model").is_file():
            return TiktokenBPE(path / "tiktoken.model")
        raise FileNotFoundError(f"tokenizer: directory {path} holds no {META_FILE}, tokenizer.json or tiktoken.model")
    if path.suffix == ".json":
        return HFTokenizer(path)
    return TiktokenBPE(path)
