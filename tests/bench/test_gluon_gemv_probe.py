"""benchmarks/gluon_gemv_probe.py: its warp-specialised kernel compiles for sm_90a without a GPU."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.bench.test_kernel_resources import ROOT, compile_env


def test_gluon_probe_compiles_warp_specialised_for_sm90():
    env = compile_env()
    pytest.importorskip("triton.experimental.gluon")
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gluon_gemv_probe.py"), "--compile"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert len(lines) >= 4
    for line in lines:
        # every variant: registers capped for the two partitions, no spills, the partitions' register
        # split (setmaxnreg) present, i.e. warp specialisation was not dropped
        assert "0 bytes spill stores" in line and line.endswith("warpgroup"), line
