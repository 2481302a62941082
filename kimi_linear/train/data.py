"""Streamed, packed, deterministically shuffled training rows, resumable exactly.

Packing: each document's tokens are followed by the tokenizer's EOS (the document separator) and
appended to one running token stream, which is cut into rows of exactly ``seq_len`` tokens. A row
also records where documents start inside it, so varlen training can give each document its own
attention / recurrent state (``cu_seqlens``) and drop the one label that would predict across a
boundary.

Order: each epoch visits the training files in a fresh seeded permutation (``seed``, epoch), and
rows pass through a seeded shuffle buffer. The whole stream position (epoch, file cursor, document
cursor, partly-filled row, shuffle buffer and its RNG) is a plain dict from :meth:`state_dict`, so
a resumed run continues with exactly the rows the uninterrupted run would have seen.

Batches (``[B, T]``, labels are the inputs; the model shifts them, HF style):

| key         | shape / dtype           | notes                                                       |
|-------------|-------------------------|-------------------------------------------------------------|
| input_ids   | ``[B, T]`` int64        | varlen: flattened to ``[1, B*T]`` (B == 1 with cu_seqlens)   |
| labels      | ``[B, T]`` int64        | varlen: ``[1, B*T]``, -100 at every segment start but the first |
| cu_seqlens  | ``[N+1]`` int32         | varlen only: row and document spans of the flattened pack    |
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from kimi_linear.train.corpus import CorpusFile, iter_documents


@dataclass
class Row:
    tokens: list[int]
    starts: list[int]  # document starts inside the row (always includes 0)


class PackedStream:
    """Endless stream of packed rows over ``files`` (re-visited epoch after epoch).

    Args:
        files: the (training) files, in a fixed order.
        encode: text -> token ids.
        eos_id: the separator appended after every document.
        seq_len: tokens per row.
        seed: drives the per-epoch file order and the shuffle buffer.
        shuffle: False keeps file order and row order (validation).
        shuffle_buffer: rows held in the buffer (more = better mixing, more memory).
        text_field: JSONL field holding a document's text.
        epochs: stop after this many passes (None = endless).
    """

    def __init__(
        self,
        files: list[CorpusFile],
        encode: Callable[[str], list[int]],
        eos_id: int,
        seq_len: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        shuffle_buffer: int = 512,
        text_field: str = "text",
        epochs: int | None = None,
    ):
        if not files:
            raise ValueError("PackedStream needs at least one file")
        if seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {seq_len}")
        self.files, self.encode, self.eos_id, self.seq_len = files, encode, eos_id, seq_len
        self.seed, self.shuffle, self.text_field, self.epochs = seed, shuffle, text_field, epochs
        self.buffer_size = max(1, shuffle_buffer) if shuffle else 1
        self._rng = np.random.Generator(np.random.PCG64(seed))
        self.epoch = 0
        self.file_pos = 0  # index into this epoch's file order
        self.doc_pos = 0  # documents of the current file already consumed
        self._pending: list[int] = []  # tokens of the current documents; [_head:] not yet in a row
        self._head = 0
        self._pending_starts: list[int] = []  # absolute document starts inside _pending
        self._buffer: list[Row] = []
        self._doc_iter = None
        self._order = self._file_order(0)
        self.rows_emitted = 0
        self._exhausted = False

    # ------------------------------------------------------------------ order
    def _file_order(self, epoch: int) -> list[int]:
        n = len(self.files)
        if not self.shuffle:
            return list(range(n))
        return np.random.Generator(np.random.PCG64([self.seed, epoch])).permutation(n).tolist()

    def _next_document(self) -> list[int] | None:
        """Tokens of the next document (+ EOS), advancing the cursors; None when epochs ran out."""
        while True:
            if self.file_pos >= len(self._order):
                self.epoch += 1
                if self.epochs is not None and self.epoch >= self.epochs:
                    return None
                self._order = self._file_order(self.epoch)
                self.file_pos, self.doc_pos, self._doc_iter = 0, 0, None
            if self._doc_iter is None:
                f = self.files[self._order[self.file_pos]]
                self._doc_iter = iter_documents(f, self.text_field)
                for _ in range(self.doc_pos):  # resume inside a file: skip consumed documents
                    next(self._doc_iter, None)
            text = next(self._doc_iter, None)
            if text is None:
                self.file_pos += 1
                self.doc_pos, self._doc_iter = 0, None
                continue
            self.doc_pos += 1
            return self.encode(text) + [self.eos_id]

    def _next_packed_row(self) -> Row | None:
        # _pending[_head:] are the tokens not yet in a row; _pending_starts are absolute indices into
        # _pending of document starts >= _head (the first row of a stream starts a document at 0).
        T = self.seq_len
        while len(self._pending) - self._head < T:
            doc = self._next_document()
            if doc is None:
                if len(self._pending) == self._head:
                    return None
                # last partial row of a finite stream: pad with EOS
                self._pending.extend([self.eos_id] * (T - (len(self._pending) - self._head)))
                break
            if len(self._pending) > self._head:
                self._pending_starts.append(len(self._pending))
            self._pending.extend(doc)
        h = self._head
        starts = [0] + [s - h for s in self._pending_starts if h < s < h + T]
        row = Row(self._pending[h : h + T], starts)
        self._head = h + T
        self._pending_starts = [s for s in self._pending_starts if s >= self._head]
        if self._head >= 4096 and self._head * 2 >= len(self._pending):  # compact (amortised O(1))
            del self._pending[: self._head]
            self._pending_starts = [s - self._head for s in self._pending_starts]
            self._head = 0
        return row

    def next_row(self) -> Row:
        """The next row in (shuffled) order. Raises StopIteration when a finite stream ends."""
        while not self._exhausted and len(self._buffer) < self.buffer_size:
            row = self._next_packed_row()
            if row is None:
                self._exhausted = True
                break
            self._buffer.append(row)
        if not self._buffer:
            raise StopIteration
        i = int(self._rng.integers(len(self._buffer))) if self.shuffle else 0
        row = self._buffer.pop(i) if not self.shuffle else self._swap_pop(i)
        self.rows_emitted += 1
        return row

    def _swap_pop(self, i: int) -> Row:
        row = self._buffer[i]
        self._buffer[i] = self._buffer[-1]
        self._buffer.pop()
        return row

    def __iter__(self):
        while True:
            try:
                yield self.next_row()
            except StopIteration:
                return

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "file_pos": self.file_pos,
            "doc_pos": self.doc_pos,
            "pending": self._pending[self._head :],
            "pending_starts": [p - self._head for p in self._pending_starts],
            "buffer": [(r.tokens, r.starts) for r in self._buffer],
            "rng": self._rng.bit_generator.state,
            "rows_emitted": self.rows_emitted,
            "exhausted": self._exhausted,
            "num_files": len(self.files),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("num_files") != len(self.files):
            raise ValueError(
                f"data state was saved for {state.get('num_files')} training files but this corpus has "
                f"{len(self.files)}; resume with the same --data and split"
            )
        self.epoch, self.file_pos, self.doc_pos = state["epoch"], state["file_pos"], state["doc_pos"]
        self._order = self._file_order(self.epoch)
        self._doc_iter = None
        self._pending = list(state["pending"])
        self._head = 0
        self._pending_starts = list(state["pending_starts"])
        self._buffer = [Row(list(t), list(s)) for t, s in state["buffer"]]
        self._rng.bit_generator.state = state["rng"]
        self.rows_emitted = state["rows_emitted"]
        self._exhausted = state["exhausted"]


def collate(rows: list[Row], *, varlen: bool = False) -> dict[str, torch.Tensor]:
    """Stack rows into a batch (see the module table)."""
    if not rows:
        raise ValueError("collate needs at least one row")
    T = len(rows[0].tokens)
    input_ids = torch.tensor([r.tokens for r in rows], dtype=torch.long)
    labels = input_ids.clone()
    batch = {"input_ids": input_ids, "labels": labels}
    if varlen:
        # one packed sequence [1, B*T]: every row start and document start opens a segment, and the
        # label there (which the previous segment's last token would predict) is dropped
        offsets = sorted({b * T + s for b, r in enumerate(rows) for s in r.starts} | {len(rows) * T})
        flat_labels = labels.reshape(1, -1)
        flat_labels[0, torch.tensor(offsets[1:-1], dtype=torch.long)] = -100
        batch = {"input_ids": input_ids.reshape(1, -1), "labels": flat_labels,
                 "cu_seqlens": torch.tensor(offsets, dtype=torch.int32)}
    return batch


def validation_rows(
    files: list[CorpusFile], encode: Callable[[str], list[int]], eos_id: int, seq_len: int, max_rows: int,
    text_field: str = "text", scan_factor: int = 64,
) -> list[Row]:
    """A fixed validation set: ``max_rows`` packed rows spread evenly over the validation files.

    The files are packed in sorted order (no shuffling); of the first ``scan_factor * max_rows`` rows
    (all of them for a small split) every n-th is kept, so the set samples every file instead of
    the first one alone. Same files and settings -> same rows.
    """
    stream = PackedStream(files, encode, eos_id, seq_len, shuffle=False, text_field=text_field, epochs=1)
    rows = []
    for row in stream:
        rows.append(row)
        if len(rows) >= scan_factor * max_rows:
            break
    if len(rows) <= max_rows:
        return rows
    picks = np.linspace(0, len(rows) - 1, max_rows).round().astype(int)
    return [rows[i] for i in picks]


def unigram_entropy(files: list[CorpusFile], encode: Callable[[str], list[int]], eos_id: int, vocab_size: int,
                    text_field: str = "text", max_tokens: int | None = None) -> float:
    """Entropy (nats/token) of the token unigram distribution over ``files`` (EOS separators included).

    The loss a model would reach by predicting every token from the corpus frequencies alone:
    the baseline a language model must beat.
    """
    counts = np.zeros(vocab_size, dtype=np.int64)
    seen = 0
    for f in files:
        for text in iter_documents(f, text_field):
            ids = np.asarray(encode(text) + [eos_id], dtype=np.int64)
            counts += np.bincount(ids, minlength=vocab_size)[:vocab_size]
            seen += ids.size
            if max_tokens is not None and seen >= max_tokens:
                break
        if max_tokens is not None and seen >= max_tokens:
            break
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())
