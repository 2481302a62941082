"""benchmarks/chunk_kda_sweep.py: the kernel names it times and the launch settings it tries must exist.

A stale name made the session-5 sweep print "nan ms" for a whole variant (its kernel had another
name), so every name the sweep looks up in a profile is checked against the kernels that exist, and
every candidate setting against the launch table's keys.
"""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import chunk_kda_sweep as sweep  # noqa: E402

from kimi_linear.ops.kda.chunk_common import LAUNCH  # noqa: E402

# Kernel names read from the sources, not by importing the kernel modules: an import here, before
# tests/ops/conftest.py switches Triton to its interpreter, would leave compiled-mode kernels behind.
KDA_SRC = ROOT / "kimi_linear" / "ops" / "kda"


def test_profiled_kernel_names_exist():
    kernels = {m for f in ("chunk_fwd.py", "chunk_bwd.py")
               for m in re.findall(r"^def (_\w+_kernel)\(", (KDA_SRC / f).read_text(), flags=re.M)}
    assert {"_gram_kernel", "_inverse_kernel", "_decay_grad_kernel"} <= kernels  # the pattern finds kernels
    for name, names in sweep.KERNEL_NAMES.items():
        entry = sweep.ENTRY.get(name, name)  # a candidate set may be named apart from the entry it sets
        assert entry in LAUNCH, f"{entry} is not a launch-table entry"
        assert set(names) <= kernels, f"{entry}: no such kernel {set(names) - kernels}"


def test_candidates_use_known_settings():
    for name, cands in sweep.CANDIDATES.items():
        entry = sweep.ENTRY.get(name, name)
        assert name in sweep.KERNEL_NAMES, f"{name} has candidates but no kernel to time"
        for cand in cands:
            unknown = set(cand) - set(LAUNCH[entry])
            assert not unknown, f"{entry}: {unknown} not in LAUNCH[{entry!r}]"


def test_kernel_sum_adds_a_variants_kernels_and_flags_missing_ones():
    times = {"_solve_kernel": 1.5, "_gram_kernel": 0.5, "other": 9.0}
    assert sweep.kernel_sum(times, ("_solve_kernel", "_gram_kernel")) == 2.0
    assert sweep.kernel_sum(times, ("_solve_kernel", "_not_launched")) == 1.5
    assert math.isnan(sweep.kernel_sum(times, ("_missing",)))
