"""The KDA decode benchmark (``kimi-linear bench kda-decode``): one step of every sequence in a batch.

Each sequence reads its fp32 state ``[HV, K, V]`` from a pool slot and writes it back in place
(continuous batching). The state traffic, ``2 * B * HV * K * V * 4`` bytes, dominates; the result
that matters is the achieved bandwidth against the device's copy bandwidth measured in the same run
(ANCHORS.md: FLA fused_recurrent_kda reaches 2.45 TB/s at B=64 and 2.83 TB/s at B=256 on an H100).

Bytes = state read + written, plus q, k, v, raw gate, beta logits read and o written.
"""

from __future__ import annotations

import gc
from collections.abc import Sequence

import torch

from kimi_linear.bench.common import Record, fmt, format_table, markdown_table, rel_rms, time_ms
from kimi_linear.bench.registry import DECODE_PROVIDERS, Leaves, Provider, tile_variant

SWEEP_TILES = [(16, 1), (16, 2), (32, 2), (32, 4), (64, 4), (64, 8), (128, 8)]


def make_decode_inputs(B: int, H: int, K: int, V: int, T: int, *, dtype: torch.dtype, device: torch.device,
                       seed: int = 0) -> Leaves:
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=gen)

    P = B + B // 4 + 1  # a pool with free slots; sequences sit at scattered slots
    idx = torch.randperm(P, generator=gen)[:B].to(torch.int32)
    x = {
        "q": randn(B, T, H, K).to(dtype), "k": randn(B, T, H, K).to(dtype), "v": randn(B, T, H, V).to(dtype),
        "g": randn(B, T, H, K).to(dtype), "beta": randn(B, T, H).to(dtype),
        "A_log": torch.log(torch.empty(H).uniform_(1, 16, generator=gen)), "dt_bias": 0.1 * randn(H * K),
        "pool": 0.1 * randn(P, H, K, V), "idx": idx,
    }
    return {n: t.to(device) for n, t in x.items()}


def decode_bytes(x: Leaves) -> float:
    B = x["idx"].numel()
    state = 2.0 * B * x["pool"][0].numel() * 4
    io = sum(x[n].numel() * x[n].element_size() for n in ("q", "k", "v", "g", "beta")) + x["v"].numel() * x["v"].element_size()
    return state + io


def gate(p: Provider, x: Leaves) -> dict[str, float]:
    """o and the pool after one step, against the reference on an identical pool copy."""
    mine = {**x, "pool": x["pool"].clone()}
    ref = {**x, "pool": x["pool"].clone()}
    o = p.run(mine)
    o_ref = p.reference(ref)
    live = x["idx"].long()
    errs = {"o": rel_rms(o, o_ref), "pool_slots": rel_rms(mine["pool"][live], ref["pool"][live])}
    untouched = torch.ones(x["pool"].shape[0], dtype=torch.bool, device=live.device)
    untouched[live] = False
    errs["untouched_slots_changed"] = float(not torch.equal(mine["pool"][untouched], x["pool"][untouched]))
    return errs


def bench_one(p: Provider, B: int, *, H: int, K: int, V: int, T: int, device: torch.device, dtype: torch.dtype,
              env: dict[str, object], warmup: int, rep: int) -> Record:
    rec = Record(bench="kda-decode", provider=p.name, mode="fwd", shape={"B": B, "T": T, "H": H, "K": K, "V": V})
    why = p.available(device)
    if why is not None:
        rec.status = f"unavailable: {why}"
        return rec
    try:
        x = make_decode_inputs(B, H, K, V, T, dtype=dtype, device=device)
        rec.bytes = decode_bytes(x)
        rec.flop = 8.0 * B * T * H * K * V
        rec.gate = gate(p, x)
        tol = 3e-2 if dtype != torch.float32 else 1e-4
        bad = [f"{k} {v:.2e}" for k, v in rec.gate.items()
               if (k == "untouched_slots_changed" and v != 0.0) or (k != "untouched_slots_changed" and not v <= tol)]
        if bad:
            rec.status = "gate failed: " + ", ".join(bad)
            return rec
        rec.finish(time_ms(lambda: p.run(x), device, warmup=warmup, rep=rep))
        copy = env.get("copy_tbps")
        if copy:
            rec.extra["pct_of_copy"] = round(100 * rec.gbps / (float(copy) * 1e3), 1)
    except Exception as exc:  # noqa: BLE001 - reported, the run goes on
        rec.status = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    finally:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rec


COLUMNS = [
    ("B", lambda r: str(r.shape["B"])),
    ("T", lambda r: str(r.shape["T"])),
    ("provider", lambda r: r.provider),
    ("ms", lambda r: fmt(r.ms, 4)),
    ("GB/s", lambda r: fmt(r.gbps, 4)),
    ("% copy", lambda r: fmt(r.extra.get("pct_of_copy"))),
    ("vs fla", lambda r: fmt(r.extra.get("speedup_vs_fla"))),
    ("status", lambda r: r.status if len(r.status) < 90 else r.status[:87] + "..."),
]


def run(batches: Sequence[int], providers: Sequence[str], *, H: int = 32, K: int = 128, V: int = 128, T: int = 1,
        device: torch.device, dtype: torch.dtype, env: dict[str, object], sweep: bool = False,
        warmup: int = 25, rep: int = 100, log=print, on_record=None) -> list[Record]:
    unknown = [p for p in providers if p not in DECODE_PROVIDERS]
    if unknown:
        raise ValueError(f"unknown decode providers {unknown}; known: {sorted(DECODE_PROVIDERS)}")
    plist = [DECODE_PROVIDERS[p] for p in providers]
    if sweep:
        plist += [tile_variant(bv, w) for bv, w in SWEEP_TILES if bv <= max(16, V)]
    if device.type == "cuda" and plist:
        # One untimed pass first, so that the first row is not measured on a cold GPU / cold caches.
        x = make_decode_inputs(min(batches), H, K, V, T, dtype=dtype, device=device)
        for p in plist:
            if p.available(device) is None:
                try:
                    time_ms(lambda p=p: p.run(x), device, warmup=10, rep=20)
                except Exception:  # noqa: BLE001 - the measured pass reports the error
                    pass
        del x
    records = []
    for B in batches:
        rows = []
        for p in plist:
            rec = bench_one(p, B, H=H, K=K, V=V, T=T, device=device, dtype=dtype, env=env, warmup=warmup, rep=rep)
            rows.append(rec)
            log(f"  B={B:<5d} {p.name:18s} {fmt(rec.ms, 4):>8s} ms  {fmt(rec.gbps, 4):>7s} GB/s  {rec.status}")
            if on_record is not None:
                on_record(rec)
        fla = next((r for r in rows if r.provider == "fla" and r.ok), None)
        for r in rows:
            if fla is not None and r.ok and r is not fla:
                r.extra["speedup_vs_fla"] = round(fla.ms / r.ms, 3)
        records += rows
    return records


def markdown(env: dict[str, object], records: Sequence[Record]) -> str:
    return "\n".join([
        "# KDA decode benchmark (one token per sequence, state pool updated in place)", "",
        ", ".join(f"{k}: {v}" for k, v in env.items() if v is not None), "",
        "Median ms (`triton.testing.do_bench`). Bytes = fp32 state read + written + token inputs/outputs; "
        "`% copy` = achieved GB/s over the device copy bandwidth measured in this run. Every provider was "
        "gated against our reference (o, updated slots, untouched slots bit-identical) before timing; "
        "`ours[BV=..,w=..]` rows are the tile sweep behind the default tile.", "",
        markdown_table(records, COLUMNS), "",
    ])


def table(records: Sequence[Record]) -> str:
    return format_table(records, COLUMNS)
