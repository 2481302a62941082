"""The decode benchmark's model geometry and cache arithmetic (the GPU timings run only on a GPU)."""

from __future__ import annotations

import torch

from kimi_linear.bench import model_decode as md
from kimi_linear.cli import main


def test_bench_geometry_is_the_released_attention_with_reduced_moe():
    hyb, mla = md.bench_config("hybrid"), md.bench_config("mla")
    assert hyb.layer_types().count("mla") == 7 and hyb.layer_types().count("kda") == 20
    assert mla.layer_types() == ["mla"] * 27
    for c in (hyb, mla):
        assert (c.hidden_size, c.kda_num_heads, c.kda_head_dim, c.num_attention_heads, c.kv_lora_rank) == (2304, 32, 128, 32, 512)
        assert (c.num_experts, c.num_experts_per_token, c.moe_intermediate_size) == (16, 8, 1024)


def test_cache_rows_hit_the_paper_ratio_and_batch_budget():
    rows = md.cache_records([4096, 1 << 20])
    per_tok = {r["layout"]: r["bytes_per_token"] for r in rows}
    assert per_tok == {"hybrid": 8064, "mla": 31104}  # 7/27 of the all-MLA cache per token
    big = {r["layout"]: r["bytes_total_b1"] for r in rows if r["context"] == 1 << 20}
    assert md.largest_batch(big["hybrid"], 48 * 2**30, 128) == 6 and md.largest_batch(big["mla"], 48 * 2**30, 128) == 1
    assert md.largest_batch(big["mla"], 16 * 2**30, 128) == 0


def test_cache_only_command_writes_table(tmp_path, capsys):
    assert main(["bench", "decode", "--cache-only", "--contexts", "4096,8192", "--out", str(tmp_path), "--tag", "t"]) == 0
    text = (tmp_path / "decode_t.md").read_text()
    assert "| 4,096 | 8,064 | 31,104 |" in text
    assert (tmp_path / "decode_t.jsonl").read_text().count("\n") == 4


def test_markdown_and_plot_from_records(tmp_path):
    recs = md.cache_records([4096]) + [
        {"kind": "decode", "layout": lay, "context": 4096, "batch": 1, "what": "b1", "step_ms": t, "tpot_ms": t}
        for lay, t in (("hybrid", 2.0), ("mla", 3.0))
    ] + [{"kind": "prefill", "layout": lay, "context": 4096, "ms": 10.0} for lay in ("hybrid", "mla")]
    text = md.markdown({"gpu": "x"}, recs)
    assert "| 4,096 | 2.000 | 3.000 | 1.50x |" in text
    assert md.plot(recs, tmp_path / "p.png") and (tmp_path / "p.png").stat().st_size > 0


def test_markdown_puts_transformers_beside_ours():
    recs = [{"kind": "decode", "layout": "hybrid", "context": 4096, "batch": 1, "what": "b1", "step_ms": 4.0,
             "tpot_ms": 4.0},
            {"kind": "transformers", "layout": "hybrid", "context": 4096, "tpot_ms": 30.0, "transformers": "5.17.0",
             "fla": None},
            {"kind": "transformers", "layout": "hybrid", "context": 65536, "status": "OutOfMemoryError: x"},
            {"kind": "transformers", "layout": "hybrid", "context": 8192, "tpot_ms": None}]
    text = md.markdown({"gpu": "x"}, recs)
    assert "| 4,096 | 30.0 (transformers 5.17.0, fla not installed) | 4.000 | 7.5x |" in text
    assert "| 65,536 | not measured: OutOfMemoryError: x | - | - |" in text
    # a difference of two noisy runs that came out <= 0 is reported as no measurement, never as a number
    assert "| 8,192 | not measured: decode time below the timing noise | - | - |" in text


def test_run_reports_a_failing_peer_instead_of_stopping(monkeypatch):
    def boom(*a, **k):
        raise ImportError("no transformers")

    monkeypatch.setattr(md, "time_transformers", boom)
    recs = md.run(contexts=[], budget_gib=1.0, cap=1, device=torch.device("cpu"), env={}, prefill=None,
                  log=lambda s: None, layouts=(), transformers_contexts=(4096,))
    assert recs == [{"kind": "transformers", "layout": "hybrid", "context": 4096, "status": "ImportError: no transformers"}]
