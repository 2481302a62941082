"""Programmatic dependent launch (ops/pdl.py) is chosen per device: never on CPU or in Triton's
interpreter, and its two halves (the in-kernel wait, the launch attribute) always together. Its
effect on results is tested on a GPU (tests/generation/test_gpu_generation.py: bit-identical decode)."""

from __future__ import annotations

import torch

from kimi_linear.ops import pdl


def test_pdl_never_on_cpu(monkeypatch):
    monkeypatch.setattr(pdl, "ENABLED", True)
    assert not pdl.use_pdl(torch.device("cpu"))
    assert pdl.pdl_launch(torch.device("cpu")) == {"PDL": False, "launch_pdl": False}


def test_pdl_off_in_the_interpreter_and_when_disabled(monkeypatch):
    # no CUDA needed: both conditions are decided before the device is asked for its capability
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(pdl, "ENABLED", True)
    assert pdl.pdl_launch(torch.device("cuda")) == {"PDL": False, "launch_pdl": False}
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(pdl, "ENABLED", False)
    assert pdl.pdl_launch(torch.device("cuda")) == {"PDL": False, "launch_pdl": False}
