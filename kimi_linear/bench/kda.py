"""The chunked KDA benchmark (``kimi-linear bench kda``): providers side by side, fwd and fwd+bwd.

Shapes (B, T, H; K = V = 128 unless given):
  * ``fig2``  -- the paper's Figure 2 grid: B=1, H=16, T = 2048 .. 65536;
  * ``train`` -- training shapes: (8, 4096, 32) and (32, 2048, 16);
  * ``smoke`` -- a tiny CPU shape for CI (reference provider only).
Explicit shapes: ``--shapes 1x4096x16,8x4096x32`` (BxTxH, optional xK).

Counts (../shared/ANCHORS.md): bytes = every input leaf read once + o written once (fwd); fwd+bwd
adds a second read of the inputs, the read of dO and the write of one gradient per input.
FLOPs per (sequence, head) for KDA: ``6*T*K*V + 3*T*C*K + T*C^2`` with C = 64 (fwd), x3 for fwd+bwd;
causal attention: ``2*T^2*D`` (fwd), x3.5 for fwd+bwd. The floor is max(bytes / copy bandwidth,
FLOPs / matmul rate) with both ceilings measured in the same run.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kimi_linear.bench.common import (
    Record,
    floor_ms,
    fmt,
    format_table,
    gate_errors,
    gate_verdict,
    kernel_times,
    markdown_table,
    time_ms,
)
from kimi_linear.bench.registry import KDA_PROVIDERS, Leaves, Provider

MODES = ("fwd", "fwdbwd")
CHUNK = 64
# Gradients are gated on the same B and H with T capped here (the fp32 reference's autograd
# graph at T = 64K would not fit); the forward is gated at the timed shape itself.
BWD_GATE_T = 512


@dataclass(frozen=True)
class Shape:
    B: int
    T: int
    H: int
    K: int = 128
    V: int = 128

    @property
    def key(self) -> str:
        return f"B{self.B}-T{self.T}-H{self.H}" + ("" if (self.K, self.V) == (128, 128) else f"-K{self.K}-V{self.V}")

    def as_dict(self) -> dict[str, int]:
        return {"B": self.B, "T": self.T, "H": self.H, "K": self.K, "V": self.V}


SHAPE_SETS: dict[str, list[Shape]] = {
    "fig2": [Shape(1, t, 16) for t in (2048, 4096, 8192, 16384, 32768, 65536)],
    "train": [Shape(8, 4096, 32), Shape(32, 2048, 16)],
    "smoke": [Shape(1, 40, 2, 16, 16), Shape(2, 24, 1, 16, 16)],
}
SHAPE_SETS["all"] = SHAPE_SETS["fig2"] + SHAPE_SETS["train"]


def parse_shapes(spec: str) -> list[Shape]:
    """``fig2``, ``train``, ``all``, ``smoke`` or a comma list of ``BxTxH[xK]``, mixable."""
    shapes: list[Shape] = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        if part in SHAPE_SETS:
            shapes += SHAPE_SETS[part]
            continue
        try:
            nums = [int(x) for x in part.lower().split("x")]
        except ValueError:
            nums = []
        if len(nums) not in (3, 4) or min(nums) < 1:
            raise ValueError(f"shape {part!r} is not one of {sorted(SHAPE_SETS)} nor BxTxH[xK] (e.g. 1x4096x16)")
        K = nums[3] if len(nums) == 4 else 128
        shapes.append(Shape(nums[0], nums[1], nums[2], K, K))
    seen, unique = set(), []
    for s in shapes:
        if s not in seen:
            seen.add(s)
            unique.append(s)
    return unique


def make_leaves(setting: str, s: Shape, *, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Leaves:
    """The inputs of one setting (see :mod:`kimi_linear.bench.registry`), made in fp32 then cast."""
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=gen).to(device)

    B, T, H, K, V = s.B, s.T, s.H, s.K, s.V
    if setting == "attention":
        return {n: randn(B, T, H, K).to(dtype) for n in ("q", "k", "v")}
    if setting == "kda_layer":
        A_log = torch.log(torch.empty(H).uniform_(1, 16, generator=gen)).to(device)
        return {"q": randn(B, T, H, K).to(dtype), "k": randn(B, T, H, K).to(dtype), "v": randn(B, T, H, V).to(dtype),
                "g": randn(B, T, H, K).to(dtype), "beta": randn(B, T, H).to(dtype),
                "A_log": A_log, "dt_bias": (0.1 * randn(H * K))}
    gate_shape = (B, T, H) if setting == "gdn" else (B, T, H, K)
    if setting not in ("kda", "gdn"):
        raise ValueError(f"unknown input setting {setting!r}")
    return {
        "q": F.normalize(randn(B, T, H, K), dim=-1).to(dtype),
        "k": F.normalize(randn(B, T, H, K), dim=-1).to(dtype),
        "v": randn(B, T, H, V).to(dtype),
        "g": F.logsigmoid(randn(*gate_shape)).to(dtype),
        "beta": torch.sigmoid(randn(B, T, H)).to(dtype),
    }


def counts(setting: str, s: Shape, leaves: Leaves, mode: str) -> tuple[float, float]:
    """(FLOPs, bytes) of one call, per the module docstring."""
    in_bytes = sum(t.numel() * t.element_size() for t in leaves.values())
    out_bytes = s.B * s.T * s.H * s.V * leaves["v"].element_size()
    if setting == "attention":
        flop = 2.0 * s.B * s.H * s.T * s.T * s.K
        flop *= 3.5 if mode == "fwdbwd" else 1.0
    else:
        flop = s.B * s.H * (6.0 * s.T * s.K * s.V + 3.0 * s.T * CHUNK * s.K + s.T * CHUNK**2)
        flop *= 3.0 if mode == "fwdbwd" else 1.0
    nbytes = in_bytes + out_bytes if mode == "fwd" else 3 * in_bytes + 2 * out_bytes
    return flop, float(nbytes)


def _float_leaves(x: Leaves) -> list[str]:
    return [n for n, t in x.items() if t.is_floating_point()]


def gate_forward(p: Provider, leaves: Leaves, refs: dict | None = None) -> dict[str, float]:
    """Relative error of the provider's output against its fp32 reference. ``refs`` keeps references
    already computed for these leaves (keyed by the reference function): the providers of one
    setting share the same leaves, and the fp32 reference at T = 64K costs seconds per call."""
    with torch.no_grad():
        out = p.run(p.prepare(leaves))
        ref = None if refs is None else refs.get(p.reference)
        if ref is None:
            ref = p.reference({n: t.float() for n, t in leaves.items()})
            if refs is not None:
                refs[p.reference] = ref
    return gate_errors({"o": out}, {"o": ref})


def gate_backward(p: Provider, leaves: Leaves, seed: int = 1) -> dict[str, float]:
    """Gradients of every leaf against autograd through the fp32 reference, for a random dO."""
    names = _float_leaves(leaves)
    x = {n: t.detach().clone().requires_grad_(n in names) for n, t in leaves.items()}
    out = p.run(p.prepare(x))
    gen = torch.Generator(device="cpu").manual_seed(seed)
    do = torch.randn(out.shape, generator=gen).to(out.device)
    grads = torch.autograd.grad(out, [x[n] for n in names], do.to(out.dtype), allow_unused=True)
    x32 = {n: t.detach().float().requires_grad_(n in names) for n, t in leaves.items()}
    ref = p.reference(x32)
    ref_grads = torch.autograd.grad(ref, [x32[n] for n in names], do.float(), allow_unused=True)
    errs = {"o": gate_errors({"o": out}, {"o": ref})["o"]}
    for n, g, gr in zip(names, grads, ref_grads):
        if gr is None:
            continue
        errs[f"d{n}"] = math.inf if g is None else gate_errors({n: g}, {n: gr})[n]
    return errs


def _timed_fn(p: Provider, leaves: Leaves, mode: str):
    if mode == "fwd":
        prepared = {n: t.detach() for n, t in p.prepare(leaves).items()}

        def fwd() -> None:
            with torch.no_grad():
                p.run(prepared)

        return fwd
    # Time the provider's own op: its prepared arguments become the leaves (DPLR's mapping is not
    # timed); detach keeps their strides (SDPA's [B, H, T, D] views stay views).
    with torch.no_grad():
        prepared = {n: t.detach().requires_grad_(t.is_floating_point()) for n, t in p.prepare(leaves).items()}
    wrt = [t for t in prepared.values() if t.requires_grad]
    out = p.run(prepared)
    do = torch.randn_like(out)
    del out

    def fwdbwd() -> None:
        torch.autograd.grad(p.run(prepared), wrt, do, allow_unused=True)

    return fwdbwd


def graph_replay(fn, device: torch.device):
    """``fn`` captured in a CUDA graph (after warm-up calls on a side stream, as capture requires);
    returns the graph's replay. A short input's time is then the GPU's, not the host's launch path,
    as in a training loop that captures its step (every provider is timed the same way)."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def bench_one(p: Provider, s: Shape, mode: str, *, device: torch.device, dtype: torch.dtype,
              env: dict[str, object], warmup: int, rep: int, refs: dict | None = None,
              cuda_graph: bool = False, profile: bool = False) -> Record:
    """Gate, then time, one (provider, shape, mode). ``refs``: forward references of this shape's
    leaves computed by earlier rows (see :func:`gate_forward`; one dict per shape and setting).
    ``cuda_graph``: time the call replayed from a CUDA graph (:func:`graph_replay`). ``profile``: after
    timing, each kernel's time per call (eager call, torch.profiler) into ``extra["kernels_ms"]``
    (on a CPU smoke run, the ops' self CPU time)."""
    rec = Record(bench="kda", provider=p.name, mode=mode, shape=s.as_dict(), extra={"setting": p.setting})
    if cuda_graph:
        rec.extra["timing"] = "cuda_graph"
    why = p.available(device)
    if why is not None:
        rec.status = f"unavailable: {why}"
        return rec
    try:
        leaves = make_leaves(p.setting, s, dtype=dtype, device=device)
        rec.flop, rec.bytes = counts(p.setting, s, leaves, mode)
        rec.floor_ms = floor_ms(rec.flop, rec.bytes, env)
        rec.gate = gate_forward(p, leaves, refs)
        verdict = gate_verdict(rec.gate, "fwd")
        if verdict is None and mode == "fwdbwd":
            small = Shape(s.B, min(s.T, BWD_GATE_T), s.H, s.K, s.V)
            bwd = gate_backward(p, make_leaves(p.setting, small, dtype=dtype, device=device, seed=2))
            rec.gate.update({f"bwd_T{small.T}_{k}": v for k, v in bwd.items()})
            verdict = gate_verdict(bwd, "bwd")
        if verdict is not None:
            rec.status = verdict
            return rec
        fn = _timed_fn(p, leaves, mode)
        timed = graph_replay(fn, device) if cuda_graph else fn
        rec.finish(time_ms(timed, device, warmup=warmup, rep=rep))
        if profile:
            rec.extra["kernels_ms"] = {name: round(ms, 4) for name, (ms, _) in sorted(
                kernel_times(fn, device).items(), key=lambda kv: -kv[1][0])}
    except Exception as exc:  # noqa: BLE001 - a failing provider is reported, the run goes on
        rec.status = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    finally:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rec


# The KDA input settings do different work (the layer-fused one adds the norms, the gate and the
# sigmoid), so a speed-up is only quoted between rows of the same KDA setting; other ops (flash
# attention, the gated delta rule) are compared with either, as the yardsticks they are.
KDA_SETTINGS = ("kda", "kda_layer")


def comparable(ours: Record, peer: Record) -> bool:
    """Whether ``peer_ms / ours_ms`` is a like-for-like speed-up (see :data:`KDA_SETTINGS`)."""
    o, p = ours.extra.get("setting"), peer.extra.get("setting")
    return o == p or o not in KDA_SETTINGS or p not in KDA_SETTINGS


def add_ratios(records: Sequence[Record]) -> None:
    """For each of our rows: ``peer_ms / our_ms`` for every comparable timed peer at the same shape and
    mode (:func:`comparable`)."""
    by_key: dict[tuple[str, str], list[Record]] = {}
    for r in records:
        by_key.setdefault((str(sorted(r.shape.items())), r.mode), []).append(r)
    for rows in by_key.values():
        for r in rows:
            if not r.ok or not KDA_PROVIDERS.get(r.provider, None) or not KDA_PROVIDERS[r.provider].ours:
                continue
            r.extra["speedup_vs"] = {o.provider: round(o.ms / r.ms, 3) for o in rows
                                     if o.ok and o is not r and comparable(r, o)}
        for r in rows:
            if r.ok and r.floor_ms:
                r.extra["x_floor"] = round(r.ms / r.floor_ms, 2)


COLUMNS = [
    ("shape", lambda r: f"B{r.shape['B']} T{r.shape['T']} H{r.shape['H']}"),
    ("mode", lambda r: r.mode),
    ("provider", lambda r: r.provider),
    ("ms", lambda r: fmt(r.ms)),
    ("TFLOP/s", lambda r: fmt(r.tflops)),
    ("GB/s", lambda r: fmt(r.gbps, 4)),
    ("x floor", lambda r: fmt(r.extra.get("x_floor"))),
    ("status", lambda r: r.status if len(r.status) < 90 else r.status[:87] + "..."),
]


def run(shapes: Sequence[Shape], providers: Sequence[str], modes: Sequence[str], *, device: torch.device,
        dtype: torch.dtype, env: dict[str, object], warmup: int = 25, rep: int = 100,
        extra_providers: dict[str, Provider] | None = None, log=print, on_record=None,
        cuda_graph: bool = False, profile: bool = False) -> list[Record]:
    """Run every (shape, mode, provider); each row is logged (and handed to ``on_record``) as soon as
    it is measured, so a run cut short keeps what it measured. ``cuda_graph``: every provider's call
    timed from a CUDA graph (needs a CUDA device). ``profile``: per-kernel times of each timed row
    (:func:`bench_one`), listed by :func:`markdown`."""
    if cuda_graph and device.type != "cuda":
        raise ValueError(f"cuda_graph timing needs a CUDA device, got {device}")
    registry = {**KDA_PROVIDERS, **(extra_providers or {})}
    unknown = [p for p in providers if p not in registry]
    if unknown:
        raise ValueError(f"unknown providers {unknown}; known: {sorted(registry)}")
    bad_modes = [m for m in modes if m not in MODES]
    if bad_modes:
        raise ValueError(f"unknown modes {bad_modes}; known: {list(MODES)}")
    records = []
    for s in shapes:
        refs: dict[str, dict] = {}  # per setting: this shape's forward references (the leaves are seeded)
        for mode in modes:
            for name in providers:
                p = registry[name]
                rec = bench_one(p, s, mode, device=device, dtype=dtype, env=env, warmup=warmup, rep=rep,
                                refs=refs.setdefault(p.setting, {}), cuda_graph=cuda_graph, profile=profile)
                records.append(rec)
                log(f"  {s.key:18s} {mode:6s} {name:14s} {fmt(rec.ms):>8s} ms  {rec.status}")
                if on_record is not None:
                    on_record(rec)
    add_ratios(records)
    return records


def markdown(env: dict[str, object], records: Sequence[Record]) -> str:
    lines = ["# KDA chunked benchmark", "",
             ", ".join(f"{k}: {v}" for k, v in env.items() if v is not None), "",
             "Median ms (`triton.testing.do_bench`, after warm-up); every provider passed the correctness gate "
             "against our reference before timing, otherwise its status says why it was not timed. "
             "`x floor` = ms / (max(bytes / copy bandwidth, FLOPs / matmul rate)).", "",
             markdown_table(records, COLUMNS), ""]
    ratios = [r for r in records if r.extra.get("speedup_vs")]
    if ratios:
        lines += ["## Our speed-up over each peer (peer ms / our ms)", "",
                  "Between rows of the same KDA input setting (log-decay input, or layer-fused); flash "
                  "attention and the gated delta rule against both.", ""]
        for r in ratios:
            pairs = ", ".join(f"{k} {v:.2f}x" for k, v in r.extra["speedup_vs"].items())
            lines.append(f"- B{r.shape['B']} T{r.shape['T']} H{r.shape['H']} {r.mode} {r.provider}: {pairs}")
        lines.append("")
    profiled = [r for r in records if r.extra.get("kernels_ms")]
    if profiled:
        lines += ["## Where each call's time goes (`--profile`)", "",
                  "Per kernel, ms per call (torch.profiler over eager calls after the timing; the sum can exceed "
                  "the timed ms where kernels overlap and falls short of it by host gaps). Kernels under 1% of "
                  "the row's sum are folded into `other`.", ""]
        for r in profiled:
            lines.append(f"- B{r.shape['B']} T{r.shape['T']} H{r.shape['H']} {r.mode} {r.provider} "
                         f"({fmt(r.ms)} ms timed): {kernel_summary(r.extra['kernels_ms'])}")
        lines.append("")
    return "\n".join(lines)


def kernel_summary(kernels_ms: dict[str, float], keep: float = 0.01) -> str:
    """``name ms, ...`` largest first, the kernels under ``keep`` of the total folded into ``other``,
    then the total."""
    total = sum(kernels_ms.values())
    rows = sorted(kernels_ms.items(), key=lambda kv: -kv[1])
    big = [(n, ms) for n, ms in rows if ms >= keep * total]
    rest = total - sum(ms for _, ms in big)
    parts = [f"{n} {ms:.3f}" for n, ms in big] + ([f"other {rest:.3f}"] if rest > 0 else [])
    return ", ".join(parts) + f"; sum {total:.3f}"


def table(records: Sequence[Record]) -> str:
    return format_table(records, COLUMNS)
