"""The learning-rate schedule ``lr_at`` against its definition: warmup, cosine, WSD, constant, time mode."""

from __future__ import annotations

import math

import pytest

from kimi_linear.train.optim import lr_at

LR, RATIO = 3e-3, 0.1
LO = LR * RATIO


def at(step, total=100, warmup=10, schedule="cosine", **kw):
    return lr_at(step, total=total, lr=LR, warmup=warmup, schedule=schedule, min_lr_ratio=RATIO, **kw)


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "constant"])
def test_linear_warmup_reaches_the_peak(schedule):
    for s in range(10):
        assert at(s, schedule=schedule) == pytest.approx(LR * (s + 1) / 10, rel=1e-12)
    assert at(10, schedule=schedule) == pytest.approx(LR, rel=1e-12)


def test_cosine_ends_on_min_lr_and_halves_in_the_middle():
    total, warmup = 101, 10  # after warmup: steps 10 .. 100, middle at 55
    lrs = [at(s, total=total, warmup=warmup) for s in range(warmup, total)]
    assert lrs[0] == pytest.approx(LR, rel=1e-12) and lrs[-1] == pytest.approx(LO, rel=1e-12)
    assert at(55, total=total, warmup=warmup) == pytest.approx((LR + LO) / 2, rel=1e-12)
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    # a quarter of the way (total 91, warmup 10: steps 10 .. 90, quarter at 30), by the cosine formula
    assert at(30, total=91, warmup=10) == pytest.approx(LO + 0.5 * (LR - LO) * (1 + math.cos(math.pi / 4)), rel=1e-12)


def test_wsd_is_flat_then_linear_to_min_lr():
    total = 100  # decay_fraction 0.2: the last 20 steps (80 .. 99) decay linearly, step 99 at min_lr
    for s in range(10, 80):
        assert at(s, schedule="wsd") == LR
    for s in range(80, 100):
        assert at(s, schedule="wsd") == pytest.approx(LR + (LO - LR) * (s - 79) / 20, rel=1e-12)
    assert at(total - 1, schedule="wsd") == pytest.approx(LO, rel=1e-12)


def test_constant_stays_at_peak():
    assert all(at(s, schedule="constant") == LR for s in range(10, 100))


def test_time_fraction_replaces_the_step_position():
    for sched in ("cosine", "wsd"):
        assert at(50, schedule=sched, fraction=0.0) == pytest.approx(LR, rel=1e-12)
        assert at(50, schedule=sched, fraction=1.0) == pytest.approx(LO, rel=1e-12)
        assert at(50, schedule=sched, fraction=2.0) == pytest.approx(LO, rel=1e-12)  # clamped
    assert at(50, fraction=0.5) == pytest.approx((LR + LO) / 2, rel=1e-12)
    assert at(50, schedule="wsd", fraction=0.79) == LR
    assert at(50, schedule="wsd", fraction=0.9) == pytest.approx((LR + LO) / 2, rel=1e-12)
    assert at(3, fraction=0.9) == pytest.approx(LR * 4 / 10, rel=1e-12)  # warmup still counts steps
    with pytest.raises(ValueError, match="unknown schedule"):
        at(50, schedule="linear")
