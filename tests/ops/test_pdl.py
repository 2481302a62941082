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


def test_trigger_per_kernel_from_the_table(monkeypatch):
    # a named kernel also gets its TRIGGER constexpr from EARLY_TRIGGER; a name the table lacks is refused
    assert pdl.pdl_launch(torch.device("cpu"), "fused_linear") == {"PDL": False, "launch_pdl": False, "TRIGGER": True}
    monkeypatch.setitem(pdl.EARLY_TRIGGER, "fused_linear", 0)
    assert pdl.pdl_launch(torch.device("cpu"), "fused_linear")["TRIGGER"] is False
    import pytest

    with pytest.raises(KeyError):
        pdl.pdl_launch(torch.device("cpu"), "no_such_kernel")


def test_every_trigger_entry_names_a_launch_site():
    # each table key is passed by some pdl_launch call, so a sweep over the table reaches every kernel
    import pathlib
    import re

    root = pathlib.Path(pdl.__file__).resolve().parent
    used = set()
    for path in root.rglob("*.py"):
        for line in path.read_text().splitlines():
            if "pdl_launch(" in line and "def pdl_launch" not in line:
                used |= set(re.findall(r'"(\w+)"', line.split("pdl_launch(", 1)[1]))
    assert used == set(pdl.EARLY_TRIGGER), (sorted(set(pdl.EARLY_TRIGGER) - used), sorted(used - set(pdl.EARLY_TRIGGER)))
