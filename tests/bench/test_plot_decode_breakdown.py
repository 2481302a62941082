"""benchmarks/plot_decode_breakdown.py: profile parsing, kernel grouping and the byte floors (CPU)."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
import plot_decode_breakdown as pdb  # noqa: E402

PROFILE = """hybrid B=1 context=4096 fold_norms=1 pdl=1: kernels per step 243, GPU time per step 2.888 ms
      874.6 us  x  27  gate_up_one_kernel
      863.6 us  x  74  fused_linear_kernel
      260.7 us  x   1  nvjet_sm90_tst_192x8_64x8_2x1_v_bz_TNT
       29.3 us  x   7  nvjet_sm90_tst_128x8_64x12_2x1_v_bz_NNT
       53.8 us  x   7  _latent_attn_split_kernel
        2.0 us  x   2  void at::native::vectorized_elementwise_kernel<2>
graph-replayed step: 2.867 ms (cuda_graph=True)
hybrid B=1 context=65536 fold_norms=1 pdl=1: kernels per step 243, GPU time per step 3.133 ms
      883.3 us  x  27  gate_up_one_kernel
"""


def test_profiles_are_parsed_and_grouped():
    out = pdb.parse_profiles(PROFILE)
    assert sorted(out) == [4096, 65536]
    ms, groups = out[4096]
    assert ms == 2.888
    assert groups["experts"] == 874.6 and groups["projections"] == 863.6 and groups["LM head"] == 260.7
    assert groups["MLA attention"] == pytest.approx(29.3 + 53.8)  # cuBLAS absorptions (x 7) + split kernel
    assert groups["other"] == 2.0
    assert out[65536][1]["experts"] == 883.3


def test_no_profile_is_an_error():
    with pytest.raises(SystemExit, match="no decode_profile output"):
        pdb.parse_profiles("graph-replayed step: 2.867 ms")


def test_floors_follow_the_geometry():
    # the decode benchmark's model: ~6.2 GB of active weights; the cache adds 7 MLA layers x 576 bf16 per token
    short, long = pdb.floor_bytes("hybrid", 4096), pdb.floor_bytes("hybrid", 65536)
    weights = short["experts"] + short["projections"] + short["LM head"] + short["router"]
    assert 5.5e9 < weights < 6.5e9
    assert long["MLA attention"] - short["MLA attention"] == 7 * (65536 - 4096) * 576 * 2
    assert short["KDA state + norms"] == 20 * 32 * 128 * 128 * 4 * 2
