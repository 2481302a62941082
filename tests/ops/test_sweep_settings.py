"""benchmarks/chunk_kda_sweep.py's two input settings run what they name (interpreter, tiny shape).

The sweep's --fused switch must time the layer-fused path (raw gates through A_log / dt_bias, q/k
L2 norm, beta sigmoid), not the plain one on inputs that merely look like it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from kimi_linear.ops.kda.fusion import KDAFusion
from kimi_linear.ops.kda.reference import chunk_kda_ref

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import chunk_kda_sweep as sweep  # noqa: E402


@pytest.mark.parametrize("fused", [False, True])
def test_sweep_inputs_run_the_named_setting(fused, monkeypatch, triton_device):
    monkeypatch.setattr(sweep, "DEVICE", triton_device)
    monkeypatch.setattr(sweep, "DTYPE", torch.float32)
    monkeypatch.setattr(sweep, "FUSED", fused)
    xs, do = sweep.inputs(1, 40, 2, K=16)
    assert len(xs) == (7 if fused else 5)
    o = sweep.step_once(xs, do)
    f32 = [x.detach().float() for x in xs]
    fusion = KDAFusion(qk_l2norm=True, beta_sigmoid=True, A_log=f32[5], dt_bias=f32[6]) if fused else None
    ref, _ = chunk_kda_ref(*f32[:5], fusion=fusion)
    assert ((o.detach() - ref).norm() / ref.norm()).item() < 1e-4
    assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in xs)
