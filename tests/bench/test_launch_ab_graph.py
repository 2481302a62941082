"""benchmarks/launch_ab_graph.py: variant specs parse, write into the launch table and come back out;
unknown entries or keys, malformed specs, modes, rounds and shapes are refused with a message before any
device work (not silently timed as base); the preflight drops variants whose check child fails or hangs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import launch_ab_graph as ab  # noqa: E402

from kimi_linear.ops.kda.chunk_common import LAUNCH, launch_overrides  # noqa: E402


def test_variant_parses_and_round_trips():
    assert ab.parse_variant("base") == {}
    edits = ab.parse_variant("gate.merge_l2norm=1,decay_grad.factored=0,decay_grad.rolled=0")
    assert edits == {"gate": {"merge_l2norm": 1}, "decay_grad": {"factored": 0, "rolled": 0}}
    before = {e: dict(v) for e, v in LAUNCH.items()}
    # values that differ from the table's, so the check below sees the edit
    flipped = {e: {f: 1 - int(LAUNCH[e][f]) for f in kv} for e, kv in edits.items()}
    with launch_overrides(flipped):
        assert all(LAUNCH[e][f] == v for e, kv in flipped.items() for f, v in kv.items())
    assert LAUNCH == before


def test_overrides_restored_when_the_block_raises():
    before = {e: dict(v) for e, v in LAUNCH.items()}
    with pytest.raises(RuntimeError), launch_overrides({"gate": {"merge_l2norm": 1}}):
        raise RuntimeError("a candidate that does not compile")
    assert LAUNCH == before


@pytest.mark.parametrize("spec", ["gate.merge_l2norm", "gate=1", "gate.merge_l2norm=x"])
def test_malformed_variant_refused(spec):
    with pytest.raises(SystemExit, match="is not ENTRY.KEY=INT"):
        ab.parse_variant(spec)


@pytest.mark.parametrize("spec", ["nosuch.BK=1", "gate.nosuch=1", "gate.merge_l2norm=1,gate.nosuch=1"])
def test_unknown_entry_or_key_refused_and_table_untouched(spec):
    before = {e: dict(v) for e, v in LAUNCH.items()}
    with pytest.raises(SystemExit, match="launch table has no"):
        ab.parse_variant(spec)
    with pytest.raises(KeyError, match="launch table has no"):  # the context manager checks on its own
        with launch_overrides({"gate": {"merge_l2norm": 1}, spec.split(".")[0]: {"nosuch": 1}}):
            pass
    assert LAUNCH == before


@pytest.mark.parametrize("argv,msg", [
    (["--shape", "1x4096x16", "--variant", "base", "--modes", "fwdx"], "--modes takes"),
    (["--shape", "1x4096x16", "--variant", "base", "--rounds", "0"], "--rounds >= 1"),
    (["--shape", "4096", "--variant", "base"], "nor BxTxH"),
    (["--shape", "1x4096x16", "--variant", "gate.x"], "is not ENTRY.KEY=INT"),
    (["--shape", "1x4096x16", "--variant", "gate.nosuch=1"], "launch table has no"),
])
def test_bad_arguments_refused_before_any_device_work(argv, msg, monkeypatch, capsys):
    # the checks run before the CUDA check, so they answer the same on this CPU-only machine
    monkeypatch.setattr(sys, "argv", ["launch_ab_graph.py", *argv])
    with pytest.raises(SystemExit) as exc:
        ab.main()
    assert msg in (str(exc.value.code) + capsys.readouterr().err)


def test_preflight_drops_faulting_and_hanging_variants(capsys):
    # the child's outcome per variant: clean, an illegal-address fault, no answer in time; base unchecked
    calls = []

    def fake_run(cmd, capture_output, text, timeout):
        calls.append(cmd)
        name = cmd[cmd.index("--variant") + 1]
        assert "--check" in cmd and cmd[-2:] == ["--shape", "8x4096x32"] and timeout == 5.0
        if name == "state_bwd.num_stages=1":
            return subprocess.CompletedProcess(cmd, 1, "", "Traceback ...\ntorch.AcceleratorError: CUDA error: an illegal memory access was encountered\n")
        if name == "gate.merge_l2norm=1":
            raise subprocess.TimeoutExpired(cmd, timeout)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    specs = ["base", "chunk_grad.half_dots=0", "state_bwd.num_stages=1", "gate.merge_l2norm=1"]
    variants = {s: ab.parse_variant(s) for s in specs}
    kept = ab.preflight(variants, ["--modes", "fwdbwd", "--shape", "8x4096x32"], 5.0, run=fake_run)
    assert list(kept) == ["base", "chunk_grad.half_dots=0"]
    assert kept["chunk_grad.half_dots=0"] == {"chunk_grad": {"half_dots": 0}}
    assert len(calls) == 3  # base is not checked
    out = capsys.readouterr().out
    assert "variant state_bwd.num_stages=1 dropped: torch.AcceleratorError: CUDA error: an illegal memory access" in out
    assert "variant gate.merge_l2norm=1 dropped: no answer in 5 s" in out


def test_profile_table_has_every_kernel_of_every_variant(monkeypatch):
    # --profile: one column per variant, each variant's kernels timed with its launch-table edits in force,
    # a kernel one variant does not launch shown as 0, the last column minus the first
    import torch

    from kimi_linear.bench import common, kda
    from kimi_linear.bench.registry import KDA_PROVIDERS

    def fake_times(fn, device):
        fn()
        if LAUNCH["l2norm"]["on_load"]:
            return {"_rstd_kernel": (0.19, 1), "_gram_kernel": (0.78, 1)}
        return {"_l2norm_fwd_kernel": (0.36, 1), "_gram_kernel": (0.74, 1)}

    monkeypatch.setattr(common, "kernel_times", fake_times)
    monkeypatch.setattr(kda, "_timed_fn", lambda p, leaves, mode: (lambda: None))
    monkeypatch.setattr(kda, "make_leaves", lambda *a, **k: {})
    shape = kda.parse_shapes("1x64x2")[0]
    variants = {s: ab.parse_variant(s) for s in ("l2norm.on_load=1", "l2norm.on_load=0")}
    out = ab.profile(KDA_PROVIDERS["ours_fused"], shape, "fwd", variants, torch.device("cpu")).splitlines()
    rows = {line.split()[0]: [float(x) for x in line.split()[1:]] for line in out[1:]}
    assert "l2norm.on_load=1" in out[0] and "l2norm.on_load=0" in out[0]
    assert rows["_gram_kernel"] == pytest.approx([0.78, 0.74, -0.04])
    assert rows["_l2norm_fwd_kernel"] == pytest.approx([0.0, 0.36, 0.36])
    assert rows["_rstd_kernel"] == pytest.approx([0.19, 0.0, -0.19])
    assert rows["total"] == pytest.approx([0.97, 1.10, 0.13])
    assert list(rows)[0] == "_gram_kernel"  # the largest first
