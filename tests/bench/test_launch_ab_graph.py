"""benchmarks/launch_ab_graph.py: variant specs parse, write into the launch table and come back out;
unknown entries or keys, malformed specs, modes, rounds and shapes are refused with a message before any
device work (not silently timed as base)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import launch_ab_graph as ab  # noqa: E402

from kimi_linear.ops.kda.chunk_common import LAUNCH  # noqa: E402


def test_variant_parses_and_round_trips():
    assert ab.parse_variant("base") == {}
    edits = ab.parse_variant("gate.merge_l2norm=1,decay_grad.factored=0")
    assert edits == {("gate", "merge_l2norm"): 1, ("decay_grad", "factored"): 0}
    before = {e: dict(v) for e, v in LAUNCH.items()}
    flipped = {key: 1 - int(LAUNCH[key[0]][key[1]]) for key in edits}  # values that differ from the table's
    old = ab.apply(flipped)
    try:
        assert all(LAUNCH[e][f] == v for (e, f), v in flipped.items())
    finally:
        ab.restore(old)
    assert LAUNCH == before


@pytest.mark.parametrize("spec", ["gate.merge_l2norm", "gate=1", "gate.merge_l2norm=x"])
def test_malformed_variant_refused(spec):
    with pytest.raises(SystemExit, match="is not ENTRY.KEY=INT"):
        ab.parse_variant(spec)


@pytest.mark.parametrize("spec", ["nosuch.BK=1", "gate.nosuch=1", "gate.merge_l2norm=1,gate.nosuch=1"])
def test_unknown_entry_or_key_refused_and_table_untouched(spec):
    before = {e: dict(v) for e, v in LAUNCH.items()}
    with pytest.raises(SystemExit, match="launch table has no"):
        ab.apply(ab.parse_variant(spec))
    assert LAUNCH == before


@pytest.mark.parametrize("argv,msg", [
    (["--shape", "1x4096x16", "--variant", "base", "--modes", "fwdx"], "--modes takes"),
    (["--shape", "1x4096x16", "--variant", "base", "--rounds", "0"], "--rounds >= 1"),
    (["--shape", "4096", "--variant", "base"], "nor BxTxH"),
    (["--shape", "1x4096x16", "--variant", "gate.x"], "is not ENTRY.KEY=INT"),
])
def test_bad_arguments_refused_before_any_device_work(argv, msg, monkeypatch, capsys):
    # the checks run before the CUDA check, so they answer the same on this CPU-only machine
    monkeypatch.setattr(sys, "argv", ["launch_ab_graph.py", *argv])
    with pytest.raises(SystemExit) as exc:
        ab.main()
    assert msg in (str(exc.value.code) + capsys.readouterr().err)
