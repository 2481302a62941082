"""Whole-model decode benchmark (the paper's Figures 1b / 7): 3:1 hybrid vs the same stack all-MLA.

Model: the released model's attention geometry (hidden 2304, 27 layers, 32 KDA heads of 128, MLA 32
heads with a 512 latent + 64 shared key part, vocab 163840, the released KDA/MLA layout) with the MoE
reduced to fit one GPU (16 experts, top-8, one shared expert, 1024 wide; layer 0 dense 9216), bf16,
random weights. The all-MLA model is the same stack with every layer MLA.

Measured per layout and context length:

* cache bytes per token and in total (:func:`kimi_linear.generation.cache.cache_bytes`; exact, no GPU);
* time per output token (TPOT) at batch 1: one greedy decode step (CUDA graph replay + argmax);
* decode throughput at the largest batch whose cache fits the same memory budget for both layouts
  (capped), reported as step time and as time per output token = step time / batch (1 / throughput);
* prefill time per context length (one cached forward over a random prompt; best of two calls after
  an untimed first one at the same length), at the lengths that are affordable in the run.

To reach long contexts without minutes of prefill, the decode timings run on caches filled with
random latents / states of the right size and ``lengths`` set to the context (the work per step does
not depend on the values); prefill is timed separately. A correctness gate runs first on each model:
cached prefill + decode against the full forward (relative RMS error of the logits), in fp32 on the
same geometry cut to 4 layers; the full bf16 model's deviation is recorded beside it (bf16 rounding
is amplified by a deep random MoE stack, whose expert choices flip between equivalent computations).
"""

from __future__ import annotations

import gc
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

KiB = 1024
CONTEXTS = [4096, 16384, 65536, 131072, 262144, 524288, 1048576]
PREFILL = {"hybrid": [4096, 16384, 32768, 65536], "mla": [4096, 16384, 32768, 65536]}
GATE_SEED = 0  # the gate model's weights (see run)
GATE_TOL = 1e-2  # fp32 inputs, tf32 dots on GPU; a gate against wrong results, not rounding


def bench_config(layout: str, *, experts: int = 16, top_k: int = 8, layers: int = 27, vocab: int = 163840):
    """The released geometry with a reduced MoE; ``layout`` "hybrid" (released 3:1) or "mla" (all MLA)."""
    from kimi_linear.model.config import kimi_linear_48b_a3b

    released = kimi_linear_48b_a3b()
    lac = dict(released.linear_attn_config)
    if layers != 27:
        kda = [i for i in range(1, layers + 1) if i % 4 != 0 and i != layers]
        lac.update(kda_layers=kda, full_attn_layers=[i for i in range(1, layers + 1) if i not in kda])
    if layout == "mla":
        lac.update(kda_layers=[], full_attn_layers=list(range(1, layers + 1)))
    return released.replace(num_experts=experts, num_experts_per_token=top_k, num_hidden_layers=layers,
                            vocab_size=vocab, linear_attn_config=lac, dtype="bfloat16")


def build_model(config, device: torch.device, dtype: torch.dtype):
    from kimi_linear.model.modeling import KimiLinearForCausalLM

    with torch.device(device):
        model = KimiLinearForCausalLM(config, backend="auto")
    model = model.to(dtype=dtype).eval()
    model.pack_experts_()  # inference: the prefill's grouped GEMMs read the experts in place
    return model


def active_param_bytes(model) -> int:
    """Bytes every decoded token must read at batch 1: all weights except the unchosen experts and the
    embedding table (one row)."""
    total = 0
    for name, p in model.named_parameters():
        if name == "model.embed_tokens.weight":
            continue
        total += p.numel() * p.element_size()
    for block in model.moe_blocks():
        per = sum(p.numel() * p.element_size() for p in block.experts[0].parameters())
        total -= per * (block.num_experts - block.top_k)
    return total


@torch.no_grad()
def gate(model, device: torch.device) -> float:
    """Cached prefill + 4 decode steps against the full forward: relative RMS error of the logits."""
    from kimi_linear.generation.cache import cache_for_config
    from kimi_linear.generation.generate import _model_dtype, forward_last_logits

    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (2, 68), generator=g).to(device)
    full = model(ids).logits.float()
    cache = cache_for_config(model.config, batch_size=2, max_len=68, device=device, dtype=_model_dtype(model))
    outs = [forward_last_logits(model, ids[:, :64], cache)]
    for t in range(64, 67):
        outs.append(forward_last_logits(model, ids[:, t:t + 1], cache))
    got = torch.stack(outs, 1).float()
    ref = full[:, 63:67]
    return ((got - ref).norm() / ref.norm()).item()


def _fill_random_(cache, context: int) -> None:
    """Random latents / states of the right size; every row holds ``context`` tokens."""
    for kind, layer in zip(cache.layer_kinds, cache.layers):
        if kind == "mla":
            layer.latent[:, :context].normal_()
            layer.k_rope[:, :context].normal_()
        elif kind == "kda":
            layer.state.normal_(std=0.05)
            for w in layer.convs:
                w.normal_()
    cache.lengths.fill_(context)


@torch.no_grad()
def time_decode(model, batch: int, context: int, device: torch.device, *, steps: int = 16,
                rounds: int = 3) -> dict[str, float]:
    """Step time (ms) of graph-replayed greedy decode steps at ``context`` cached tokens: the median over
    ``rounds`` rounds of the mean of ``steps`` steps (``step_ms_rounds``: every round's). One round was
    not enough: in session 12's full benchmark a 128K batch-1 round right after a large-batch run took
    3.58 ms where three other measurements of the same step gave 3.38-3.39."""
    from kimi_linear.generation.cache import cache_for_config
    from kimi_linear.generation.generate import _GraphedDecoder, _model_dtype, forward_last_logits
    from kimi_linear.generation.sampling import SamplingConfig, next_token

    cache = cache_for_config(model.config, batch_size=batch, max_len=context + rounds * steps + 4, device=device,
                             dtype=_model_dtype(model))
    _fill_random_(cache, context)
    cuda = device.type == "cuda"
    if cuda:
        dec = _GraphedDecoder(model, cache, min_bucket=cache.max_len)
        step = dec.step
    else:  # CPU smoke runs: eager steps
        dec = None
        step = lambda t, n: forward_last_logits(model, t.view(-1, 1), cache)  # noqa: E731
    greedy = SamplingConfig()
    tok = torch.randint(0, model.config.vocab_size, (batch,), device=device)
    length = context
    for _ in range(3):  # eager step (warm-up + capture), then two replays
        length += 1
        tok = next_token(step(tok, length), greedy)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    per_round = []
    for _ in range(max(rounds, 1)):
        t0 = time.perf_counter()
        for _ in range(steps):
            length += 1
            tok = next_token(step(tok, length), greedy)
        sync()
        per_round.append((time.perf_counter() - t0) * 1e3 / steps)  # includes the host's argmax read-back
    ms = sorted(per_round)[len(per_round) // 2]
    mem = cache.memory()
    graphed = dec is not None and bool(dec.graphs) and not dec.failed
    return {"step_ms": ms, "tpot_ms": ms / batch, "cache_bytes": mem["total_allocated"], "cuda_graph": graphed,
            "step_ms_rounds": per_round}


@torch.no_grad()
def time_prefill(model, context: int, device: torch.device) -> float:
    from kimi_linear.generation.cache import cache_for_config
    from kimi_linear.generation.generate import _model_dtype, forward_last_logits

    ids = torch.randint(0, model.config.vocab_size, (1, context), device=device)
    cache = cache_for_config(model.config, batch_size=1, max_len=context, device=device, dtype=_model_dtype(model))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    forward_last_logits(model, ids, cache)
    sync()
    return (time.perf_counter() - t0) * 1e3


IN_GRAPH_STEPS = 16


@torch.no_grad()
def time_kda_layer_step(model, device: torch.device, env: dict) -> dict[str, float]:
    """One KDA layer's decode step at batch 1 (CUDA graph), against its bytes (weights + state r/w) over
    the copy bandwidth measured in this run. ``ms``: one step per graph replay (includes the graph's
    launch); ``ms_in_graph``: ``IN_GRAPH_STEPS`` steps captured in one graph, per step -- how the step
    runs inside a whole-model decode graph, where layers follow each other without a launch between."""
    from kimi_linear.bench.common import time_ms
    from kimi_linear.generation.cache import cache_for_config
    from kimi_linear.ops.prefetch import join_prefetches

    idx = model.config.layer_types().index("kda")
    layer = model.model.layers[idx].self_attn
    dtype = next(layer.q_proj.parameters()).dtype
    cache = cache_for_config(model.config, batch_size=1, max_len=8, device=device, dtype=dtype)
    x = torch.randn(1, 1, model.config.hidden_size, device=device, dtype=dtype)
    cache.begin_step(1, key_len=8)

    def step(n: int = 1):  # n layer steps, then their L2 prefetches (ops/prefetch.py) joined, as the model's
        for _ in range(n):  # forward joins them after its last layer
            layer(x, cache=cache)
        join_prefetches()

    step()  # warm-up / compile
    if device.type == "cuda":
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        ms = time_ms(graph.replay, device)
        many = torch.cuda.CUDAGraph()
        with torch.cuda.graph(many):
            step(IN_GRAPH_STEPS)
        ms_in_graph = time_ms(many.replay, device) / IN_GRAPH_STEPS
    else:
        ms = ms_in_graph = time_ms(step, device)
    cache.abort_step()
    lc = cache.layers[idx]
    weights = sum(p.numel() * p.element_size() for p in layer.parameters())
    state = 2 * sum(t.numel() * t.element_size() for t in lc.tensors())
    bw = float(env.get("copy_tbps") or 2.97) * 1e12
    floor = (weights + state) / bw * 1e3
    return {"ms": ms, "bytes": weights + state, "floor_ms": floor, "ratio": ms / floor,
            "ms_in_graph": ms_in_graph, "ratio_in_graph": ms_in_graph / floor}


def _empty_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def largest_batch(per_seq_bytes: int, budget: int, cap: int) -> int:
    return max(1, min(cap, budget // per_seq_bytes)) if per_seq_bytes <= budget else 0


def cache_records(contexts: list[int], layouts=("hybrid", "mla"), **cfg_kw) -> list[dict]:
    """The cache-size rows alone (exact arithmetic, no GPU)."""
    from kimi_linear.generation.cache import cache_bytes, specs_from_config

    rows = []
    for lay in layouts:
        kinds, kda, mla = specs_from_config(bench_config(lay, **cfg_kw))
        for ctx in contexts:
            cb = cache_bytes(kinds, batch_size=1, context=ctx, kda=kda, mla=mla, dtype=torch.bfloat16)
            rows.append({"kind": "cache", "layout": lay, "context": ctx, "bytes_per_token": cb["bytes_per_token"],
                         "bytes_fixed_per_sequence": cb["bytes_per_sequence_fixed"], "bytes_total_b1": cb["total"]})
    return rows


def run(*, contexts: list[int], budget_gib: float, cap: int, device: torch.device, env: dict,
        prefill: dict[str, list[int]] | None, log: Callable[[str], None], layouts=("hybrid", "mla"),
        experts: int = 16, top_k: int = 8, layers: int = 27, vocab: int = 163840,
        on_record: Callable[[dict], None] | None = None, transformers_contexts: tuple[int, ...] = ()) -> list[dict]:
    from kimi_linear.generation.cache import cache_bytes, specs_from_config

    records: list[dict] = []

    def emit(rec: dict) -> None:
        records.append(rec)
        log(json.dumps(rec))
        if on_record is not None:
            on_record(rec)

    budget = int(budget_gib * 2**30)
    configs = {lay: bench_config(lay, experts=experts, top_k=top_k, layers=layers, vocab=vocab) for lay in layouts}
    for rec in cache_records(contexts, layouts, experts=experts, top_k=top_k, layers=layers, vocab=vocab):
        emit(rec)
    for lay, cfg in configs.items():
        t0 = time.perf_counter()
        # The gate runs in fp32 on the same geometry cut to 4 layers (the same kernels at the same shapes):
        # in bf16 a deep random MoE model amplifies rounding (expert choices flip between two equivalent
        # computations), so the full bf16 model's deviation is recorded for information only.
        # Seeded: the same gate model in every run, whatever ran before it. Its routing can flip where two
        # experts' scores nearly tie (fp32 logits against the kernels' TF32 / fp32 sums: one flipped token
        # costs ~4e-2 of rel RMS); benchmarks/decode_gate_routing.py rebuilds this model and lists them.
        torch.manual_seed(GATE_SEED)
        small = build_model(bench_config(lay, experts=experts, top_k=top_k, layers=4, vocab=vocab), device,
                            torch.float32)
        err = gate(small, device)
        del small
        _empty_cache()
        model = build_model(cfg, device, torch.bfloat16)
        ok = err <= GATE_TOL
        emit({"kind": "gate", "layout": lay, "rel_rms": err, "tolerance": GATE_TOL, "ok": ok,
              "gate_model": "fp32, 4 layers, same geometry", "bf16_full_model_rel_rms": gate(model, device),
              "active_param_bytes": active_param_bytes(model), "build_s": time.perf_counter() - t0})
        if not ok:
            log(f"{lay}: gate failed ({err:.3e}); not timed")
            del model
            continue
        if lay == "hybrid":
            emit({"kind": "kda_layer", "layout": lay, **time_kda_layer_step(model, device, env)})
        kinds, kda, mla = specs_from_config(cfg)
        for ctx in contexts:
            cb = cache_bytes(kinds, batch_size=1, context=ctx + 32, kda=kda, mla=mla, dtype=torch.bfloat16)
            per_seq = cb["total"]
            if per_seq > budget:
                emit({"kind": "decode", "layout": lay, "context": ctx, "batch": 1, "what": "b1",
                      "status": f"cache {per_seq / 2**30:.1f} GiB > budget {budget_gib} GiB"})
                continue
            bmax = largest_batch(per_seq, budget, cap)
            for batch, what in [(1, "b1")] + ([(bmax, "bmax")] if bmax > 1 else []):
                try:
                    res = time_decode(model, batch, ctx, device)
                    emit({"kind": "decode", "layout": lay, "context": ctx, "batch": batch, "what": what, **res})
                except torch.OutOfMemoryError as exc:
                    emit({"kind": "decode", "layout": lay, "context": ctx, "batch": batch, "what": what,
                          "status": f"out of memory: {str(exc)[:120]}"})
                gc.collect()
                _empty_cache()
        for ctx in (prefill or {}).get(lay, []):
            try:
                # The first call at a new length pays the allocator's growth, shape-specialised kernel
                # compilation and cuDNN plans (H100, hybrid at 4K: 677, then 327, then 227 ms; a warm-up at
                # 1K did not cover it): reported apart, and the time is the best of the next two calls.
                first = time_prefill(model, ctx, device)
                best = min(time_prefill(model, ctx, device) for _ in range(2))
                emit({"kind": "prefill", "layout": lay, "context": ctx, "ms": best, "first_call_ms": first})
            except torch.OutOfMemoryError as exc:
                emit({"kind": "prefill", "layout": lay, "context": ctx, "status": f"out of memory: {str(exc)[:120]}"})
            gc.collect()
            _empty_cache()
        del model
        gc.collect()
        _empty_cache()
    for ctx in transformers_contexts:  # the peer, in the same run (its own model: same geometry, random weights)
        try:
            emit(time_transformers(ctx, device, experts=experts, top_k=top_k))
        except Exception as exc:  # noqa: BLE001 (a missing or failing peer is reported, not fatal)
            emit({"kind": "transformers", "layout": "hybrid", "context": ctx, "status": f"{type(exc).__name__}: {str(exc)[:160]}"})
        gc.collect()
        _empty_cache()
    return records


# ------------------------------------------------------------------------------------------------ output


def _get(records, **kw):
    return [r for r in records if all(r.get(k) == v for k, v in kw.items())]


def markdown(env: dict, records: list[dict], note: str = "") -> str:
    lines = [f"# Whole-model decode: 3:1 hybrid vs all-MLA ({env.get('gpu')}, torch {env.get('torch')}, "
             f"triton {env.get('triton')}, commit {env.get('commit')}, {env.get('date_utc')})", ""]
    if note:
        lines += [note, ""]
    lines += ["## Cache bytes (bf16)", "", "| context | hybrid B/token | all-MLA B/token | hybrid total (B=1) | all-MLA total (B=1) | ratio |",
              "|---|---|---|---|---|---|"]
    for ctx in sorted({r["context"] for r in _get(records, kind="cache")}):
        h = _get(records, kind="cache", layout="hybrid", context=ctx)
        m = _get(records, kind="cache", layout="mla", context=ctx)
        if h and m:
            lines.append(f"| {ctx:,} | {h[0]['bytes_per_token']:,} | {m[0]['bytes_per_token']:,} | "
                         f"{h[0]['bytes_total_b1'] / 2**30:.2f} GiB | {m[0]['bytes_total_b1'] / 2**30:.2f} GiB | "
                         f"{h[0]['bytes_total_b1'] / m[0]['bytes_total_b1']:.3f} |")
    lines += ["", "## Correctness gate (cached prefill + 3 decode steps vs the full forward)", ""]
    for r in _get(records, kind="gate"):
        extra = (f"; full 27-layer bf16 model (information): {r['bf16_full_model_rel_rms']:.2e}"
                 if "bf16_full_model_rel_rms" in r else "")
        lines.append(f"- {r['layout']}: rel RMS {r['rel_rms']:.2e} ({r.get('gate_model', 'timed model')}, tol {r['tolerance']}) "
                     f"-> {'ok' if r['ok'] else 'FAILED'}{extra}; active weights read per token {r['active_param_bytes'] / 1e9:.2f} GB")
    for r in _get(records, kind="kda_layer"):
        lines.append(f"- one KDA layer decode step (B=1, CUDA graph): {r['ms'] * 1e3:.1f} us vs floor "
                     f"{r['floor_ms'] * 1e3:.1f} us ({r['bytes'] / 1e6:.1f} MB weights + state r/w) = {r['ratio']:.2f}x")
        if "ms_in_graph" in r:
            lines.append(f"  ({IN_GRAPH_STEPS} steps in one graph, as layers run inside the model's graph: "
                         f"{r['ms_in_graph'] * 1e3:.1f} us per step = {r['ratio_in_graph']:.2f}x)")
    lines += ["", "## Decode (greedy, CUDA graph)", "",
              "| context | hybrid TPOT B=1 (ms) | all-MLA TPOT B=1 (ms) | speedup | hybrid B_max | hybrid ms/token at B_max | "
              "all-MLA B_max | all-MLA ms/token at B_max | speedup at B_max |", "|---|---|---|---|---|---|---|---|---|"]

    def dec(lay, ctx, what):
        rows = [r for r in _get(records, kind="decode", layout=lay, context=ctx, what=what) if "tpot_ms" in r]
        if what == "bmax" and not rows:  # B_max == 1: the batch-1 row is the largest batch
            rows = [r for r in _get(records, kind="decode", layout=lay, context=ctx, what="b1") if "tpot_ms" in r]
        return rows[0] if rows else None

    for ctx in sorted({r["context"] for r in _get(records, kind="decode")}):
        h1, m1, hb, mb = dec("hybrid", ctx, "b1"), dec("mla", ctx, "b1"), dec("hybrid", ctx, "bmax"), dec("mla", ctx, "bmax")

        def f(r, key="tpot_ms"):
            return f"{r[key]:.3f}" if r else "-"

        sp1 = f"{m1['tpot_ms'] / h1['tpot_ms']:.2f}x" if h1 and m1 else "-"
        spb = f"{mb['tpot_ms'] / hb['tpot_ms']:.2f}x" if hb and mb else "-"
        lines.append(f"| {ctx:,} | {f(h1)} | {f(m1)} | {sp1} | {hb['batch'] if hb else '-'} | {f(hb)} | "
                     f"{mb['batch'] if mb else '-'} | {f(mb)} | {spb} |")
    skipped = [r for r in _get(records, kind="decode") if "status" in r]
    if skipped:
        lines += [""] + [f"- not run: {r['layout']} ctx {r['context']:,} B={r['batch']}: {r['status']}" for r in skipped]
    peer = _get(records, kind="transformers")
    if peer:
        lines += ["", "## transformers' own generate, same geometry, same run (batch 1, greedy)", "",
                  "| context | transformers TPOT (ms) | ours, hybrid TPOT B=1 (ms) | our speed-up |", "|---|---|---|---|"]
        for r in peer:
            ours = dec("hybrid", r["context"], "b1")
            mine = f"{ours['tpot_ms']:.3f}" if ours else "-"
            if r.get("tpot_ms") is None:
                why = r.get("status") or "decode time below the timing noise"
                lines.append(f"| {r['context']:,} | not measured: {why} | {mine} | - |")
                continue
            sp = f"{r['tpot_ms'] / ours['tpot_ms']:.1f}x" if ours else "-"
            lines.append(f"| {r['context']:,} | {r['tpot_ms']:.1f} (transformers {r.get('transformers')}, "
                         f"fla {r.get('fla') or 'not installed'}) | {mine} | {sp} |")
    lines += ["", "## Prefill (one forward, B=1, bf16)", "", "| context | hybrid (ms) | all-MLA (ms) | speedup |",
              "|---|---|---|---|"]
    for ctx in sorted({r["context"] for r in _get(records, kind="prefill")}):
        h = [r for r in _get(records, kind="prefill", layout="hybrid", context=ctx) if "ms" in r]
        m = [r for r in _get(records, kind="prefill", layout="mla", context=ctx) if "ms" in r]
        sp = f"{m[0]['ms'] / h[0]['ms']:.2f}x" if h and m else "-"
        lines.append(f"| {ctx:,} | {h[0]['ms']:.1f} | {m[0]['ms']:.1f} | {sp} |" if h and m else
                     f"| {ctx:,} | {h[0]['ms'] if h else '-'} | {m[0]['ms'] if m else '-'} | {sp} |")
    return "\n".join(lines) + "\n"


def plot(records: list[dict], path: str | Path, title: str = "") -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(22, 4.6))
    colors = {"hybrid": "tab:blue", "mla": "tab:red"}
    names = {"hybrid": "Kimi Linear 3:1 (ours)", "mla": "all MLA (ours)"}
    for lay in ("hybrid", "mla"):
        rows = sorted(_get(records, kind="cache", layout=lay), key=lambda r: r["context"])
        if rows:
            axes[0].plot([r["context"] for r in rows], [r["bytes_total_b1"] / 2**30 for r in rows], "o-",
                         color=colors[lay], label=names[lay])
        for ax, what in ((axes[1], "b1"), (axes[2], "bmax")):
            rows = sorted((r for r in _get(records, kind="decode", layout=lay, what=what) if "tpot_ms" in r),
                          key=lambda r: r["context"])
            if rows:
                ax.plot([r["context"] for r in rows], [r["tpot_ms"] for r in rows], "o-", color=colors[lay],
                        label=names[lay])
                if what == "bmax":
                    for r in rows:
                        ax.annotate(f"B={r['batch']}", (r["context"], r["tpot_ms"]), fontsize=7)
        rows = sorted((r for r in _get(records, kind="prefill", layout=lay) if "ms" in r), key=lambda r: r["context"])
        if rows:
            axes[3].plot([r["context"] for r in rows], [r["ms"] / 1e3 for r in rows], "o-", color=colors[lay],
                         label=names[lay])
    titles = ["KV cache per sequence (GiB)", "time per output token, batch 1 (ms)",
              "time per output token at the largest batch in budget (ms)", "prefill time (s)"]
    for ax, t in zip(axes, titles):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context length (tokens)")
        ax.set_title(t, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


@torch.no_grad()
def time_transformers(context: int, device: torch.device, *, layout: str = "hybrid", new_tokens: int = 8,
                      experts: int = 16, top_k: int = 8) -> dict:
    """transformers' own ``generate`` on the same geometry (random weights, bf16, batch 1, greedy): TPOT from
    two runs that differ only in the number of new tokens (both prefill the same prompt)."""
    import transformers

    cfg = bench_config(layout, experts=experts, top_k=top_k)
    lac = cfg.linear_attn_config
    hf_cfg = transformers.KimiLinearConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        moe_intermediate_size=cfg.moe_intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
        kv_lora_rank=cfg.kv_lora_rank, qk_nope_head_dim=cfg.qk_nope_head_dim, qk_rope_head_dim=cfg.qk_rope_head_dim,
        v_head_dim=cfg.v_head_dim, num_local_experts=experts, num_experts_per_tok=top_k, n_shared_experts=1,
        linear_attn_config=lac, first_k_dense_replace=cfg.first_k_dense_replace, pad_token_id=0, bos_token_id=1,
        eos_token_id=2,
    )
    with torch.device(device):
        hf = transformers.KimiLinearForCausalLM(hf_cfg)
    hf = hf.to(torch.bfloat16).eval()
    ids = torch.randint(3, cfg.vocab_size, (1, context), device=device)
    def run(n: int) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        assert out.shape[1] == context + n
        return time.perf_counter() - t0

    # The first call pays FLA's autotuning and Triton's compilation (79 s on an H100, which made the
    # difference below negative in an earlier run): one untimed call first, then the best of two each.
    warmup_s = run(1 + new_tokens)
    times = {n: min(run(n), run(n)) for n in (1, 1 + new_tokens)}
    tpot = (times[1 + new_tokens] - times[1]) / new_tokens * 1e3
    if tpot <= 0:  # noise larger than the decode time: no measurement rather than a wrong one
        tpot = None
    return {"kind": "transformers", "layout": layout, "context": context, "tpot_ms": tpot,
            "prefill_plus_one_s": times[1], "first_call_s": warmup_s, "transformers": transformers.__version__,
            "fla": _module_version("fla")}


def _module_version(name: str) -> str | None:
    try:
        return __import__(name).__version__
    except Exception:  # noqa: BLE001
        return None
