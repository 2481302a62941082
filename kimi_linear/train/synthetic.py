"""Synthetic recall tasks of the paper's Figure 4: Palindrome, MQAR, Stack (exact layouts: docs/synthetic.md).

Every generator returns ``input_ids [B, L]`` and ``labels [B, L]`` (int64) for sequences of exactly
``L`` tokens. Labels follow the model's convention (HF style, shifted inside the model):
``labels[b, t] = input_ids[b, t]`` where the task defines the token at ``t`` as an answer that must
be predicted from ``input_ids[b, :t]``, and -100 everywhere else. Accuracy is measured on exactly
those positions (argmax of the logits at ``t - 1``).

Token ids (shared by the three tasks; ``VOCAB_SIZE`` = 1024 + 1024 + 16):

| ids            | meaning                                                      |
|----------------|--------------------------------------------------------------|
| 0              | PAD (fills the tail of a Stack sequence; never labelled)     |
| 1              | SEP (Palindrome: end of the source half)                     |
| 2, 3           | PUSH, POP (Stack)                                            |
| 16 .. 16+1023  | "key" symbols: MQAR keys, Palindrome symbols, Stack ids (64) |
| 1040 .. 2063   | "value" symbols: MQAR values, Stack values                   |

Randomness: a batch is a pure function of ``(seed, step)`` (``numpy`` PCG64 seeded with both), so a
run can be repeated or resumed exactly, and an evaluation set is a fixed batch drawn from a seed no
training step uses (``EVAL_SEED_BASE + length``).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

PAD, SEP, PUSH, POP = 0, 1, 2, 3
KEY0, NUM_KEYS = 16, 1024
VAL0, NUM_VALUES = KEY0 + NUM_KEYS, 1024
VOCAB_SIZE = VAL0 + NUM_VALUES
IGNORE = -100
EVAL_SEED_BASE = 10_000_019

PALINDROME_SYMBOLS = 64  # symbols drawn for palindrome sequences (from the key range)
NUM_STACKS = 64
STACK_VALUES = 64
STACK_PUSH_PROB = 0.55  # chance of PUSH when the chosen stack is non-empty (stacks grow slowly)


def _rng(seed: int, step: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64([seed, step]))


def palindrome(batch: int, length: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``x_1 .. x_n SEP x_n .. x_1`` (+ one PAD at the start when ``length`` is even).

    n = (length - 1) // 2 symbols from a 64-symbol alphabet; labels on the n mirrored symbols.
    """
    if length < 3:
        raise ValueError(f"palindrome needs length >= 3, got {length}")
    n = (length - 1) // 2
    src = KEY0 + rng.integers(0, PALINDROME_SYMBOLS, size=(batch, n))
    lead = np.full((batch, length - (2 * n + 1)), PAD, dtype=np.int64)
    x = np.concatenate([lead, src, np.full((batch, 1), SEP), src[:, ::-1]], axis=1).astype(np.int64)
    y = np.full_like(x, IGNORE)
    y[:, length - n:] = x[:, length - n:]
    return x, y


def mqar_pairs(length: int) -> int:
    """Key-value pairs in an MQAR sequence of ``length`` tokens: length // 8 (capped by the key vocabulary)."""
    return min(max(1, length // 8), NUM_KEYS)


def mqar(batch: int, length: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Multi-query associative recall: ``k_1 v_1 .. k_P v_P`` then queries ``k v`` until the end.

    P = length // 8 distinct keys (from 1024) with random values (from 1024); the query part
    (length - 2P tokens, an odd remainder padded with one PAD at the start) repeats keys drawn
    uniformly from the P with their values; labels on the query values.
    """
    if length < 4:
        raise ValueError(f"mqar needs length >= 4, got {length}")
    P = mqar_pairs(length)
    Q = (length - 2 * P) // 2
    keys = np.argsort(rng.random((batch, NUM_KEYS)), axis=1)[:, :P] + KEY0
    vals = VAL0 + rng.integers(0, NUM_VALUES, size=(batch, P))
    ctx = np.stack([keys, vals], axis=2).reshape(batch, 2 * P)
    pick = rng.integers(0, P, size=(batch, Q))
    qk = np.take_along_axis(keys, pick, axis=1)
    qv = np.take_along_axis(vals, pick, axis=1)
    queries = np.stack([qk, qv], axis=2).reshape(batch, 2 * Q)
    lead = np.full((batch, length - 2 * P - 2 * Q), PAD, dtype=np.int64)
    x = np.concatenate([lead, ctx, queries], axis=1).astype(np.int64)
    y = np.full_like(x, IGNORE)
    y[:, length - 2 * Q + 1::2] = x[:, length - 2 * Q + 1::2]
    return x, y


def stack(batch: int, length: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """64 stacks, a stream of ``PUSH s v`` and ``POP s v`` operations; labels on the popped ``v``.

    Each operation picks a stack uniformly; an empty stack is pushed, a non-empty one is pushed with
    probability 0.55 and popped otherwise (``v`` then is the value on its top). Values come from 64
    symbols. Operations are 3 tokens; the sequence is filled with whole operations and padded with
    PAD at the end.
    """
    if length < 3:
        raise ValueError(f"stack needs length >= 3, got {length}")
    x = np.full((batch, length), PAD, dtype=np.int64)
    y = np.full((batch, length), IGNORE, dtype=np.int64)
    n_ops = length // 3
    sid = rng.integers(0, NUM_STACKS, size=(batch, n_ops))
    coin = rng.random((batch, n_ops))
    newv = rng.integers(0, STACK_VALUES, size=(batch, n_ops))
    for b in range(batch):
        stacks: list[list[int]] = [[] for _ in range(NUM_STACKS)]
        row, lab = x[b], y[b]
        for i in range(n_ops):
            s, t = int(sid[b, i]), 3 * i
            st = stacks[s]
            row[t + 1] = KEY0 + s
            if st and coin[b, i] >= STACK_PUSH_PROB:
                row[t] = POP
                row[t + 2] = VAL0 + st.pop()
                lab[t + 2] = row[t + 2]
            else:
                v = int(newv[b, i])
                st.append(v)
                row[t], row[t + 2] = PUSH, VAL0 + v
    return x, y


TASKS: dict[str, Callable[[int, int, np.random.Generator], tuple[np.ndarray, np.ndarray]]] = {
    "palindrome": palindrome,
    "mqar": mqar,
    "stack": stack,
}


def make_batch(task: str, batch: int, length: int, *, seed: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Training batch ``step`` of a run seeded ``seed``: ``(input_ids [B, L], labels [B, L])`` int64."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {sorted(TASKS)}")
    if batch < 1 or length < 1:
        raise ValueError(f"batch and length must be >= 1, got batch={batch}, length={length}")
    x, y = TASKS[task](batch, length, _rng(seed, step))
    return torch.from_numpy(x), torch.from_numpy(y)


def eval_set(task: str, length: int, size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed evaluation set of a task and length (same on every machine and run)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {sorted(TASKS)}")
    x, y = TASKS[task](size, length, _rng(EVAL_SEED_BASE + length, sorted(TASKS).index(task)))
    return torch.from_numpy(x), torch.from_numpy(y)


def describe(task: str, length: int = 24, seed: int = 0) -> str:
    """One small example as text (for docs and ``kimi-linear synthetic show``)."""

    def name(t: int) -> str:
        if t == PAD:
            return "_"
        if t == SEP:
            return "|"
        if t == PUSH:
            return "PUSH"
        if t == POP:
            return "POP"
        if KEY0 <= t < VAL0:
            return f"k{t - KEY0}"
        return f"v{t - VAL0}"

    x, y = make_batch(task, 1, length, seed=seed, step=0)
    toks = [name(int(t)) + ("*" if int(lab) != IGNORE else "") for t, lab in zip(x[0], y[0])]
    return " ".join(toks)
