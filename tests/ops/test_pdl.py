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


def test_every_weights_before_wait_entry_names_a_launch_site():
    # each WEIGHTS_BEFORE_WAIT key is passed to weights_before_wait by some launch (fused_linear's as
    # "fused_linear_" + its launch-settings class), so an A/B over the table reaches every kernel
    import pathlib
    import re

    from kimi_linear.ops import gemv

    root = pathlib.Path(pdl.__file__).resolve().parent
    used = set()
    for path in root.rglob("*.py"):
        used |= set(re.findall(r'weights_before_wait\("(\w+)"\)', path.read_text()))
    assert 'weights_before_wait(f"fused_linear_{_tiles_class(D, rows)}")' in pathlib.Path(gemv.__file__).read_text()
    used |= {f"fused_linear_{cls}" for cls in gemv.TILES}
    assert used == set(pdl.WEIGHTS_BEFORE_WAIT), sorted(used ^ set(pdl.WEIGHTS_BEFORE_WAIT))


def _decode_kernels_once(device):
    """Every kernel with a WEIGHTS_BEFORE_WAIT entry, once, on fresh random inputs (the same each call): the
    fused projections in each launch-settings class (several D-slices with the folded norm and conv steps,
    or with the residual; a narrow one with an input per weight), the split router with the folded norm,
    and both latent absorptions. Returns every output (and the conv window, updated in place)."""
    from kimi_linear.ops import gemv, latent_absorb_triton, moe_route_kernel

    g = torch.Generator(device="cpu").manual_seed(7)

    def rnd(*shape, s=1.0):
        return (torch.randn(*shape, generator=g) * s).to(device)

    D = 600  # not a multiple of the slice: the first slice (read before the wait), a full one, a masked one
    x, nw = rnd(1, D), rnd(D).abs() + 0.5
    window = rnd(1, 12, 3)
    ws = [rnd(12, D, s=D**-0.5), rnd(5, D, s=D**-0.5)]  # 17 rows: "wide" (FEW_ROWS patched below)
    outs = gemv.fused_linear(x, ws, conv_steps=[(window, rnd(12, 4)), None], norm_weight=nw, backend="triton")
    outs += gemv.fused_linear(x, [rnd(7, D)], residual=rnd(1, 7), backend="triton")  # "wide_few"
    outs += gemv.fused_linear([rnd(1, 64), rnd(1, 64)], [rnd(40, 64), rnd(9, 64)], backend="triton")  # "narrow"
    outs.append(window)
    scratch = moe_route_kernel.RouterScratch()
    outs += moe_route_kernel.route_triton(None, rnd(16), 4, True, 2.5, hidden=(rnd(1, 1000), rnd(16, 1000, s=0.03)),
                                          scratch=scratch, norm_weight=rnd(1000).abs() + 0.5)
    H, Dn, Dv, R = 4, 16, 16, 64
    w_kv_b = rnd(H * (Dn + Dv), R, s=0.1)
    outs.append(latent_absorb_triton.absorb_query(rnd(1, H, Dn), w_kv_b, torch.float32))
    outs.append(latent_absorb_triton.absorb_output(rnd(1, H, R), w_kv_b, Dn, torch.float32))
    return outs


def test_weights_read_before_the_wait_give_the_same_results(monkeypatch, triton_device):
    # W_EARLY moves each kernel's parameter loads above its PDL wait (fused_linear: the table entry and the
    # first D-slice, then the loop over the rest): the same values, bit for bit, with every entry on and
    # off -- in the interpreter the reordered code itself, on a GPU also with PDL's overlap
    from kimi_linear.ops import gemv

    monkeypatch.setattr(gemv, "FEW_ROWS", 16)
    slices = {cls: dict(t, BLOCK_D=256) for cls, t in gemv.TILES.items() if cls != "narrow"}
    monkeypatch.setattr(gemv, "TILES", {**gemv.TILES, **slices})
    monkeypatch.setattr(gemv, "NORM_TILES", {})
    results = {}
    for on in (0, 1):
        for key in pdl.WEIGHTS_BEFORE_WAIT:
            monkeypatch.setitem(pdl.WEIGHTS_BEFORE_WAIT, key, on)
        results[on] = _decode_kernels_once(triton_device)
    assert len(results[0]) == len(results[1]) == 10
    for i, (a, b) in enumerate(zip(results[0], results[1], strict=True)):
        assert torch.equal(a, b), f"output {i} differs with the parameters read before the wait"
        assert torch.isfinite(a.float()).all()
