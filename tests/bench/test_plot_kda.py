"""kimi_linear.bench.plot.plot_kda: a Figure-2 sweep (two or more lengths at B=1 H=16) is drawn as lines
against T; a run of one length or of unrelated shapes as bars per shape with the KDA floor; untimed rows
are left out, and a run with nothing timed draws nothing."""

from __future__ import annotations

import pytest

from kimi_linear.bench import plot
from kimi_linear.bench.common import Record


def rec(provider, T, ms, B=1, H=16, mode="fwd", status="ok", setting="kda"):
    return Record(bench="kda", provider=provider, mode=mode, shape=dict(B=B, T=T, H=H, K=128, V=128),
                  status=status, ms=ms, floor_ms=0.1 * T / 4096, extra={"setting": setting})


@pytest.fixture
def drawn(monkeypatch):
    calls = []
    real_lines, real_bars = plot._figure2_lines, plot._shape_bars
    monkeypatch.setattr(plot, "_figure2_lines", lambda ax, rows: (calls.append(("lines", rows)), real_lines(ax, rows)))
    monkeypatch.setattr(plot, "_shape_bars", lambda ax, rows: (calls.append(("bars", rows)), real_bars(ax, rows)))
    return calls


def test_figure2_sweep_is_lines(tmp_path, drawn):
    rows = [rec(p, T, ms) for p in ("ours", "fla_kda") for T, ms in ((2048, 0.2), (4096, 0.4))]
    path = plot.plot_kda(rows, tmp_path / "f.png")
    assert (tmp_path / "f.png").stat().st_size > 0 and path == str(tmp_path / "f.png")
    assert [kind for kind, _ in drawn] == ["lines"]


def test_one_length_or_other_shapes_are_bars_without_untimed_rows(tmp_path, drawn):
    rows = [rec("ours", 4096, 0.38), rec("flash", 4096, 0.15, setting="attention"),
            rec("fla_kda", 4096, None, status="error: x"), rec("ours", 4096, 1.4, B=8, H=32, mode="fwdbwd")]
    plot.plot_kda(rows, tmp_path / "b.png")
    assert [kind for kind, _ in drawn] == ["bars", "bars"]
    assert all(r.ok for _, rs in drawn for r in rs)
    assert {r.provider for r in drawn[0][1]} == {"ours", "flash"}


def test_nothing_timed_draws_nothing(tmp_path):
    assert plot.plot_kda([rec("ours", 4096, None, status="unavailable: no GPU")], tmp_path / "n.png") is None
    assert not (tmp_path / "n.png").exists()
