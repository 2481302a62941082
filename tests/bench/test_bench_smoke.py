"""The benchmark harness on CPU (smoke mode): gates reject wrong providers, output parses.

Timings are never asserted; only the procedure (gate before timing, reporting, files) is tested.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kimi_linear.bench import decode, kda
from kimi_linear.bench.common import environment, read_jsonl
from kimi_linear.bench.registry import DECODE_PROVIDERS, KDA_PROVIDERS, Provider
from kimi_linear.cli import main

CPU = torch.device("cpu")
TINY = [kda.Shape(1, 20, 1, 8, 8)]


def _variant(base: Provider, name: str, run) -> Provider:
    return Provider(name, base.setting, "test provider", base.available, base.prepare, run, base.reference)


def _env():
    return environment(CPU, ceilings=False)


def test_gate_rejects_wrong_provider_and_reports_failures():
    ref = KDA_PROVIDERS["reference"]
    extra = {
        "scaled": _variant(ref, "scaled", lambda x: 1.1 * ref.run(x)),  # 10% off: must fail the gate
        "shifted": _variant(ref, "shifted", lambda x: torch.roll(ref.run(x), 1, dims=1)),  # acausal by one step
        "raises": _variant(ref, "raises", lambda x: (_ for _ in ()).throw(RuntimeError("kernel exploded"))),
        "absent": Provider("absent", "kda", "never available", lambda d: "not installed here", ref.prepare,
                           ref.run, ref.reference),
    }
    recs = kda.run(TINY, ["reference", *extra], ["fwd", "fwdbwd"], device=CPU, dtype=torch.float32, env=_env(),
                   extra_providers=extra, log=lambda s: None)
    by = {(r.provider, r.mode): r for r in recs}
    for mode in ("fwd", "fwdbwd"):
        assert by[("reference", mode)].ok and by[("reference", mode)].ms > 0
        for name in ("scaled", "shifted"):
            r = by[(name, mode)]
            assert r.status.startswith("gate failed") and r.ms is None, (name, mode, r.status)
        assert by[("raises", mode)].status.startswith("error: RuntimeError: kernel exploded")
        assert by[("absent", mode)].status == "unavailable: not installed here"
    # the fwd+bwd gate checks every gradient
    assert {"bwd_T20_dq", "bwd_T20_dk", "bwd_T20_dv", "bwd_T20_dg", "bwd_T20_dbeta"} <= set(by[("reference", "fwdbwd")].gate)


def test_gate_catches_wrong_gradient_only():
    ref = KDA_PROVIDERS["reference"]

    class HalfGradV(torch.autograd.Function):
        @staticmethod
        def forward(ctx, v):
            return v.clone()

        @staticmethod
        def backward(ctx, dv):
            return 0.5 * dv

    wrong_bwd = _variant(ref, "wrong_bwd", lambda x: ref.run({**x, "v": HalfGradV.apply(x["v"])}))
    recs = kda.run(TINY, ["wrong_bwd"], ["fwd", "fwdbwd"], device=CPU, dtype=torch.float32, env=_env(),
                   extra_providers={"wrong_bwd": wrong_bwd}, log=lambda s: None)
    assert recs[0].ok, "forward is right"
    assert recs[1].status.startswith("gate failed") and "dv" in recs[1].status


def test_forward_reference_computed_once_per_shape_and_reference():
    """The run reuses a shape's forward reference across providers and modes (same seeded leaves),
    but never across shapes or across providers whose reference differs."""
    ref = KDA_PROVIDERS["reference"]
    calls = []

    def counted(x):
        if not torch.is_grad_enabled():  # the forward gate (the backward gate differentiates its own)
            calls.append(x["q"].shape[1])
        return ref.reference(x)

    counted_ref = Provider("a", ref.setting, "test", ref.available, ref.prepare, ref.run, counted)
    other = Provider("b", ref.setting, "test", ref.available, ref.prepare, ref.run, lambda x: 1.1 * counted(x))
    same = Provider("c", ref.setting, "test", ref.available, ref.prepare, ref.run, counted)
    shapes = [kda.Shape(1, 20, 1, 8, 8), kda.Shape(1, 24, 1, 8, 8)]
    recs = kda.run(shapes, ["a", "b", "c"], ["fwd", "fwdbwd"], device=CPU, dtype=torch.float32, env=_env(),
                   extra_providers={"a": counted_ref, "b": other, "c": same}, log=lambda s: None)
    # per shape: one forward reference for a and c (one function), one for b (b's calls counted() too)
    assert calls == [20, 20, 24, 24], calls
    by = {(r.provider, r.mode, r.shape["T"]): r for r in recs}
    assert by[("a", "fwd", 20)].ok and by[("c", "fwdbwd", 24)].ok
    assert by[("b", "fwd", 24)].status.startswith("gate failed"), "b's own (different) reference was used"


def test_decode_gate_rejects_provider_that_skips_the_state_update():
    ref = DECODE_PROVIDERS["reference"]

    def no_update(x):
        return ref.run({**x, "pool": x["pool"].clone()})  # right outputs, pool never written

    good = decode.bench_one(ref, 3, H=2, K=8, V=8, T=1, device=CPU, dtype=torch.float32, env=_env(), warmup=1, rep=1)
    bad = decode.bench_one(_variant(ref, "no_update", no_update), 3, H=2, K=8, V=8, T=1, device=CPU,
                           dtype=torch.float32, env=_env(), warmup=1, rep=1)
    assert good.ok and good.gate["untouched_slots_changed"] == 0.0
    assert bad.status.startswith("gate failed") and "pool_slots" in bad.status and bad.ms is None


@pytest.mark.parametrize("command", ["kda", "kda-decode"])
def test_cli_smoke_writes_files_and_one_json_line(command, tmp_path: Path, capsys):
    args = ["bench", command, "--smoke", "--out", str(tmp_path), "--tag", "t", "--no-plot"]
    if command == "kda":
        args += ["--shapes", "1x16x1x8", "--modes", "fwd"]
    else:
        args += ["--batches", "2", "--heads", "1", "--head-dim", "8"]
    assert main(args) == 0
    out_lines = capsys.readouterr().out.strip().splitlines()
    payload = json.loads(out_lines[-1])
    assert payload["bench"] == command and payload["results"]
    assert all(r["status"] == "ok" and r["ms"] > 0 for r in payload["results"])
    assert "provider" in out_lines[0]  # the human table comes first
    envs, recs = read_jsonl([tmp_path / f"{command}_t.jsonl"])
    assert len(recs) == len(payload["results"]) and envs[0]["torch"] == torch.__version__
    assert (tmp_path / f"{command}_t.md").read_text().count("| ok |") == len(recs)


def test_cuda_graph_timing_needs_a_gpu(tmp_path: Path, capsys):
    # on a machine without one: a clear refusal from the CLI and from kda.run, nothing timed
    args = ["bench", "kda", "--smoke", "--cuda-graph", "--out", str(tmp_path), "--shapes", "1x16x1x8", "--no-plot"]
    assert main(args) == 2
    assert "--cuda-graph needs a CUDA device" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
    with pytest.raises(ValueError, match="needs a CUDA device"):
        kda.run(TINY, ["reference"], ["fwd"], device=CPU, dtype=torch.float32, env=_env(), cuda_graph=True)


def test_parse_shapes():
    assert kda.parse_shapes("fig2")[-1] == kda.Shape(1, 65536, 16)
    assert kda.parse_shapes("train,8x4096x32") == kda.SHAPE_SETS["train"]  # duplicates dropped
    assert kda.parse_shapes("2x64x4x32") == [kda.Shape(2, 64, 4, 32, 32)]
    with pytest.raises(ValueError, match="BxTxH"):
        kda.parse_shapes("1x2")


def test_kernel_times_counts_launches_per_call():
    from kimi_linear.bench.common import kernel_times

    a = torch.randn(64, 64)
    times = kernel_times(lambda: (a @ a) @ a, torch.device("cpu"), reps=2)
    ms, launches = times["aten::mm"]
    assert launches == 2 and ms >= 0.0


def test_speedups_only_between_comparable_settings():
    """ours (log-decay input) is not quoted against a layer-fused peer, nor ours_fused against the
    log-decay one; flash attention and the gated delta rule are yardsticks for both."""
    from kimi_linear.bench.common import Record

    shape = {"B": 1, "T": 64, "H": 1, "K": 8, "V": 8}

    def row(provider, setting, ms):
        return Record(bench="kda", provider=provider, mode="fwd", shape=shape, ms=ms, extra={"setting": setting})

    rows = [row("ours", "kda", 1.0), row("ours_fused", "kda_layer", 2.0), row("fla_kda", "kda", 3.0),
            row("fla_kda_safe", "kda_layer", 4.0), row("fla_gdn", "gdn", 5.0), row("flash", "attention", 6.0)]
    kda.add_ratios(rows)
    assert rows[0].extra["speedup_vs"] == {"fla_kda": 3.0, "fla_gdn": 5.0, "flash": 6.0}
    assert rows[1].extra["speedup_vs"] == {"fla_kda_safe": 2.0, "fla_gdn": 2.5, "flash": 3.0}
    assert "speedup_vs" not in rows[2].extra, "peers get no ratios of their own"


def test_profile_lists_each_timed_rows_kernels(tmp_path: Path):
    """``bench kda --profile``: every timed row carries its per-kernel (here: per-op CPU) times, largest
    first, in the JSONL, and the markdown lists them; a row that failed its gate has none."""
    from kimi_linear.bench.kda import kernel_summary

    recs = kda.run(TINY, ["reference"], ["fwd"], device=CPU, dtype=torch.float32, env=_env(), profile=True)
    kernels = recs[0].extra["kernels_ms"]
    assert recs[0].ok and kernels and all(v >= 0 for v in kernels.values())
    assert list(kernels.values()) == sorted(kernels.values(), reverse=True)
    md = kda.markdown(_env(), recs)
    assert "--profile" in md and "reference" in md.split("--profile")[1]
    assert kernel_summary({"a": 0.5, "b": 0.499, "c": 0.001}) == "a 0.500, b 0.499, other 0.001; sum 1.000"
    assert "kernels_ms" not in kda.run(TINY, ["reference"], ["fwd"], device=CPU, dtype=torch.float32,
                                       env=_env())[0].extra
    rc = main(["bench", "kda", "--smoke", "--profile", "--out", str(tmp_path), "--shapes", "1x16x1x8", "--no-plot",
               "--modes", "fwd"])
    assert rc == 0
    jsonl = next(tmp_path.glob("kda_*.jsonl")).read_text()
    assert "kernels_ms" in jsonl
