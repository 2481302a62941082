"""benchmarks/plot_stage_times.py reads the sweep's profile blocks and groups kernels into stages."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import plot_stage_times as pst  # noqa: E402

LOG = """== 1x64x1: baseline per-kernel ms (total 3.500)
      2.000  _decay_grad_kernel
      1.000  _gram_kernel
      0.500  void at::native::some_copy
   decay_grad  {'num_warps': 2}     1.500 ms  (diff 0.0e+00)
   -> decay_grad: best {'num_warps': 2} 1.500 ms (baseline 2.000)
== 1x64x1: FLA exact path per-kernel ms (total 1.250)
      1.000  chunk_kda_bwd_kernel_intra
      0.250  chunk_local_cumsum_vector_kernel
"""


def test_blocks_best_and_stage_grouping(tmp_path):
    log = tmp_path / "sweep.txt"
    log.write_text(LOG)
    ours = pst.read_block(str(log), "baseline")
    assert ours == {"_decay_grad_kernel": 2.0, "_gram_kernel": 1.0, "void at::native::some_copy": 0.5}
    assert pst.read_block(str(log), "FLA") == {"chunk_kda_bwd_kernel_intra": 1.0, "chunk_local_cumsum_vector_kernel": 0.25}
    assert pst.best_per_kernel(str(log)) == {"_decay_grad_kernel": 1.5}
    st = pst.stages(ours)
    assert st["bwd: intra-chunk decay products"] == 2.0 and st[pst.OTHER] == 0.5
    assert abs(sum(st.values()) - 3.5) < 1e-12


def test_committed_logs_parse():
    # the committed session-4 profiles stay readable by the plot script
    log = ROOT / "benchmarks" / "results" / "kda" / "sweep" / "sweep_v7_profiles_h100.txt"
    assert os.path.exists(log)
    fla = pst.read_block(str(log), "FLA")
    assert abs(sum(fla.values()) - 25.166) < 0.01  # the block's printed total


def test_bench_profile_rows_and_the_merged_launches(tmp_path):
    """A bar from a ``bench kda --profile`` JSONL row; the merged prologue / epilogue launches count as the
    gate's stage, the products and FLA's bounded-path kernels land in theirs; a row without per-kernel
    times, or a missing row, is refused by name."""
    import json

    import pytest

    rows = [dict(provider="ours_fused", mode="fwd", shape=dict(B=8, T=4096, H=32),
                 extra=dict(kernels_ms={"_rstd_prologue_kernel": 0.5, "_gram_diag_kernel": 1.0, "_wu_kernel": 0.9,
                                        "_state_fwd_kernel": 0.9})),
            dict(provider="fla_kda_safe", mode="fwd", shape=dict(B=8, T=4096, H=32),
                 extra=dict(kernels_ms={"chunk_kda_fwd_kernel_intra_sub_chunk": 0.6, "l2norm_fwd_kernel": 0.35,
                                        "kda_gate_chunk_cumsum_vector_kernel": 0.3})),
            dict(provider="flash", mode="fwd", shape=dict(B=8, T=4096, H=32), extra={})]
    path = tmp_path / "kda.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ours = pst.stages(pst.read_profile_jsonl(str(path), "ours_fused@8x4096x32@fwd"))
    gate, intra, products = (n for n, _ in pst.STAGES[:3])
    assert (ours[gate], ours[intra], ours[products], ours["fwd: state scan"]) == (0.5, 1.0, 0.9, 0.9)
    fla = pst.stages(pst.read_profile_jsonl(str(path), "fla_kda_safe@8x4096x32@fwd"))
    assert (fla[gate], fla[intra], fla["l2norm"], fla[pst.OTHER]) == (0.3, 0.6, 0.35, 0.0)
    with pytest.raises(ValueError, match="no per-kernel times"):
        pst.read_profile_jsonl(str(path), "flash@8x4096x32@fwd")
    with pytest.raises(ValueError, match="no row"):
        pst.read_profile_jsonl(str(path), "ours_fused@1x4096x16@fwd")


def test_launch_ab_tables(tmp_path):
    """A bar from a launch-table A/B log: the variant's column (headers cut to 22 characters) found by the
    order of the log's JSON rows; kernels at 0 ms (not launched by that variant) left out; an unknown
    variant or shape refused by name. The committed session-21 log reads back to its printed totals."""
    import pytest

    log = tmp_path / "ab.txt"
    log.write_text(
        "kernel (B8-T4096-H32 fwd, ms)              gram_solve.on=0,gram_d                    base  last - first\n"
        "_gram_diag_kernel                                 0.9880                  0.8745       -0.1135\n"
        "_gram_kernel                                      0.7368                  0.0000       -0.7368\n"
        "_gram_solve_kernel                                0.0000                  0.6599       +0.6599\n"
        "total                                             1.7248                  1.5344       -0.1904\n"
        '{"shape": "B8-T4096-H32", "mode": "fwd", "variant": "gram_solve.on=0,gram_diag.fill=0", "ms": [1.0]}\n'
        '{"shape": "B8-T4096-H32", "mode": "fwd", "variant": "base", "ms": [1.0]}\n')
    assert pst.read_ab_table(str(log), "base@8x4096x32@fwd") == {"_gram_diag_kernel": 0.8745,
                                                                  "_gram_solve_kernel": 0.6599}
    old = pst.read_ab_table(str(log), "gram_solve.on=0,gram_diag.fill=0@8x4096x32@fwd")
    assert old == {"_gram_diag_kernel": 0.988, "_gram_kernel": 0.7368}
    assert pst.stages(old)["fwd: intra-chunk (grams, inverse)"] == 0.988 + 0.7368
    with pytest.raises(ValueError, match="no variant"):
        pst.read_ab_table(str(log), "gram_solve.on=1@8x4096x32@fwd")
    with pytest.raises(ValueError, match="no per-kernel table"):
        pst.read_ab_table(str(log), "base@1x4096x16@fwd")
    committed = ROOT / "benchmarks" / "results" / "kda" / "session21" / "kda_ab_gram_solve_fill_defaults_h100.txt"
    assert abs(sum(pst.read_ab_table(str(committed), "base@8x4096x32@fwd").values()) - 3.9079) < 2e-3


def test_default_title_names_the_bars_shape():
    """The title and axis name the one shape / mode the bars name; bars of two shapes are refused (one
    title must not cover them); bars from sweep files keep the sweep's shape."""
    import pytest

    title, xlabel = pst.default_titles(["a=x.txt:base@8x4096x32@fwdbwd", "b=y.jsonl:fla_kda_safe@8x4096x32@fwdbwd"])
    assert "B=8 T=4096 H=32" in title and "fwd+bwd" in title and "fwd+bwd" in xlabel
    title, xlabel = pst.default_titles(["a=x.txt:base@1x4096x16@fwd"])
    assert "B=1 T=4096 H=16" in title and "fwd+bwd" not in title and "per fwd " in xlabel
    assert "B=1 T=65536 H=16" in pst.default_titles(["v4=sweep.txt:baseline"])[0]
    with pytest.raises(SystemExit, match="different shapes"):
        pst.default_titles(["a=x.txt:base@8x4096x32@fwd", "b=x.txt:base@1x4096x16@fwd"])
