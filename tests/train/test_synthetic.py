"""Synthetic task generators produce valid sequences and labels; the protocol runner runs end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kimi_linear.train.synthetic import (
    IGNORE,
    KEY0,
    NUM_STACKS,
    PAD,
    POP,
    PUSH,
    SEP,
    VAL0,
    VOCAB_SIZE,
    eval_set,
    make_batch,
    mqar_pairs,
)


@pytest.mark.parametrize("length", [9, 64, 257])
def test_palindrome(length):
    x, y = make_batch("palindrome", 8, length, seed=1, step=3)
    assert x.shape == y.shape == (8, length)
    n = (length - 1) // 2
    for b in range(8):
        row = x[b].tolist()
        lead = length - (2 * n + 1)
        assert row[:lead] == [PAD] * lead and row[lead + n] == SEP
        src, mirror = row[lead:lead + n], row[lead + n + 1:]
        assert mirror == src[::-1]
        lab = y[b].tolist()
        assert lab[:length - n] == [IGNORE] * (length - n) and lab[length - n:] == mirror


@pytest.mark.parametrize("length", [16, 128, 1001])
def test_mqar(length):
    x, y = make_batch("mqar", 6, length, seed=0, step=0)
    P = mqar_pairs(length)
    for b in range(6):
        row, lab = x[b].tolist(), y[b].tolist()
        lead = (length - 2 * P) % 2
        ctx = row[lead:lead + 2 * P]
        keys, vals = ctx[0::2], ctx[1::2]
        assert len(set(keys)) == P and all(KEY0 <= k < VAL0 for k in keys) and all(v >= VAL0 for v in vals)
        table = dict(zip(keys, vals))
        q = row[lead + 2 * P:]
        for i in range(0, len(q), 2):
            assert q[i + 1] == table[q[i]]  # every query's answer is its key's value
        labelled = [t for t, v in enumerate(lab) if v != IGNORE]
        assert labelled == list(range(lead + 2 * P + 1, length, 2))
        assert all(lab[t] == row[t] for t in labelled)


@pytest.mark.parametrize("length", [30, 600])
def test_stack(length):
    x, y = make_batch("stack", 4, length, seed=2, step=5)
    n_pops = 0
    for b in range(4):
        row, lab = x[b].tolist(), y[b].tolist()
        stacks = [[] for _ in range(NUM_STACKS)]
        for t in range(0, 3 * (length // 3), 3):
            op, s, v = row[t], row[t + 1] - KEY0, row[t + 2]
            assert 0 <= s < NUM_STACKS and v >= VAL0
            if op == PUSH:
                stacks[s].append(v)
                assert lab[t:t + 3] == [IGNORE] * 3
            else:
                assert op == POP and stacks[s], "pop of an empty stack"
                assert v == stacks[s].pop() and lab[t + 2] == v and lab[t:t + 2] == [IGNORE] * 2
                n_pops += 1
        assert row[3 * (length // 3):] == [PAD] * (length % 3)
    if length >= 600:
        assert n_pops > 20


def test_determinism_and_fixed_eval_sets():
    for task in ("palindrome", "mqar", "stack"):
        a = make_batch(task, 4, 64, seed=7, step=11)
        b = make_batch(task, 4, 64, seed=7, step=11)
        c = make_batch(task, 4, 64, seed=7, step=12)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[0], c[0])
        e1, e2 = eval_set(task, 64, 16), eval_set(task, 64, 16)
        assert torch.equal(e1[0], e2[0])
        assert int(a[0].max()) < VOCAB_SIZE and int(a[0].min()) >= 0
    with pytest.raises(ValueError, match="unknown task"):
        make_batch("copy", 1, 8, seed=0, step=0)


def test_runner_end_to_end_tiny(tmp_path):
    from kimi_linear.train.synthetic_runner import SyntheticRun, load_results, report, run_grid

    kw = dict(steps=4, batch_size=2, eval_every=2, eval_size=4, hidden_size=32, num_heads=2, head_dim=16,
              mlp_width=32, device="cpu")
    recs = run_grid(tmp_path, tasks=["mqar"], variants=["kda", "gdn", "decay"], lengths=[16], lrs=[1e-3],
                    log=lambda *_: None, **kw)
    assert len(recs) == 3 and all(r["steps_done"] == 4 and len(r["curve"]) == 2 for r in recs)
    assert all(0.0 <= r["best_acc"] <= 1.0 for r in recs)
    table, plots = report(load_results(tmp_path), tmp_path)
    assert "| mqar | 16 |" in table.read_text() and plots[0].stat().st_size > 1000
    with pytest.raises(ValueError, match="model must be"):
        SyntheticRun(task="mqar", variant="mamba", length=64, lr=1e-3).validate()


def test_models_differ_only_in_the_variant():
    from kimi_linear.train.synthetic_runner import SyntheticRun, model_config

    cfgs = {v: model_config(SyntheticRun(task="mqar", variant=v, length=64, lr=1e-3)).to_dict() for v in ("kda", "gdn", "decay")}
    for v in ("gdn", "decay"):
        diff = {k for k in cfgs["kda"].keys() | cfgs[v].keys() if cfgs["kda"].get(k) != cfgs[v].get(k)}
        assert diff == {"kda_variant"}, diff
    c = model_config(SyntheticRun(task="mqar", variant="kda", length=64, lr=1e-3))
    assert c.num_hidden_layers == 2 and c.kda_num_heads == 2 and c.kda_head_dim == 128
    assert np.all(np.array(c.layer_types()) == "kda")
