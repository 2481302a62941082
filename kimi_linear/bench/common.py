"""Shared benchmark machinery: environment record, timing, correctness gate, result files.

Every benchmark follows one procedure per (shape, mode, provider):

1. availability check (import, device) -> ``unavailable: <reason>`` when it cannot run;
2. correctness gate against our reference (:mod:`kimi_linear.ops`) -> ``gate failed: <errors>``
   and no timing when it does not match;
3. timing: ``triton.testing.do_bench`` median after warm-up on CUDA (a perf_counter median on CPU,
   smoke mode only); any exception becomes ``error: <message>``, never a crash of the run.

Output: a human table on stdout, then one JSON line; ``write_results`` also writes JSONL (one record
per line) and markdown files.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

# A gate catches wrong results (errors of order 1), not rounding: bf16 kernels against an fp32
# reference land near 1e-2 (see tests/numerics.py for the tight per-dtype tolerances of the tests).
GATE_TOLERANCE = {"fwd": 3e-2, "bwd": 6e-2}

# Device ceilings from ../shared/ANCHORS.md (H100), used when a run does not measure its own.
ANCHOR_COPY_TBPS = 2.97
ANCHOR_MATMUL_TFLOPS = 700.0


@dataclass
class Record:
    """One (shape, mode, provider) row of a benchmark."""

    bench: str
    provider: str
    mode: str
    shape: dict[str, int]
    status: str = "ok"
    ms: float | None = None
    tflops: float | None = None
    gbps: float | None = None
    flop: float | None = None
    bytes: float | None = None
    floor_ms: float | None = None
    gate: dict[str, float] = field(default_factory=dict)
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok" and self.ms is not None

    def finish(self, ms: float) -> None:
        self.ms = ms
        if self.flop:
            self.tflops = self.flop / (ms * 1e-3) / 1e12
        if self.bytes:
            self.gbps = self.bytes / (ms * 1e-3) / 1e9


def rel_rms(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64; inf when ``out`` holds NaN/Inf or shapes differ."""
    if tuple(out.shape) != tuple(ref.shape):
        return math.inf
    o, r = out.detach().double(), ref.detach().double()
    if not bool(torch.isfinite(o).all()):
        return math.inf
    den = r.norm().item()
    num = (o - r).norm().item()
    return num / den if den > 0 else num


def gate_errors(outs: dict[str, torch.Tensor], refs: dict[str, torch.Tensor]) -> dict[str, float]:
    return {name: rel_rms(outs[name], refs[name]) for name in refs}


def gate_verdict(errors: dict[str, float], kind: str) -> str | None:
    """None when every error is within the gate's tolerance, else a short description."""
    tol = GATE_TOLERANCE[kind]
    bad = {k: v for k, v in errors.items() if not v <= tol}
    if not bad:
        return None
    return "gate failed: " + ", ".join(f"{k} {v:.2e} > {tol:.0e}" for k, v in bad.items())


def time_ms(fn: Callable[[], object], device: torch.device, *, warmup: int = 25, rep: int = 100) -> float:
    """Median milliseconds of ``fn()``: ``triton.testing.do_bench`` on CUDA, perf_counter on CPU."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
    fn()  # warm-up
    samples = []
    for _ in range(3):  # CPU timing is for smoke runs only
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def kernel_times(fn: Callable[[], object], device: torch.device, *, reps: int = 3) -> dict[str, tuple[float, int]]:
    """Per-kernel time of one ``fn()`` call from torch.profiler: ``{name: (ms per call, launches per
    call)}``. On CUDA the kernels' device time; on CPU (smoke runs) the ops' self CPU time."""
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    fn()  # warm-up
    sync()
    act = torch.profiler.ProfilerActivity.CUDA if cuda else torch.profiler.ProfilerActivity.CPU
    kind = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    with torch.profiler.profile(activities=[act]) as prof:
        for _ in range(reps):
            fn()
        sync()
    us: dict[str, float] = {}
    count: dict[str, int] = {}
    for ev in prof.events():
        if ev.device_type == kind:
            us[ev.name] = us.get(ev.name, 0.0) + (ev.device_time_total if cuda else ev.self_cpu_time_total)
            count[ev.name] = count.get(ev.name, 0) + 1
    return {name: (us[name] / 1e3 / reps, count[name] // reps) for name in us}


def kernel_sequence(fn: Callable[[], object]) -> list[tuple[str, float]]:
    """``(kernel name, us)`` of one ``fn()`` on CUDA, in start order (after a warm-up call): the time of
    each launch, where :func:`kernel_times` lumps e.g. a layer's large and small projections together."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    evs = [ev for ev in prof.events() if ev.device_type == torch.autograd.DeviceType.CUDA]
    evs.sort(key=lambda ev: ev.time_range.start)
    return [(ev.name, ev.device_time_total) for ev in evs]


def _git_commit() -> str | None:
    """HEAD of the checkout (``+dirty`` with uncommitted changes); ``KIMI_LINEAR_COMMIT`` when the
    tree was copied without its git directory (e.g. to a GPU machine)."""
    if os.environ.get("KIMI_LINEAR_COMMIT"):
        return os.environ["KIMI_LINEAR_COMMIT"]
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        if out.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def source_hash() -> str:
    """SHA-1 (12 hex digits) of the package's Python sources, in path order. Identifies the code a
    result was measured with even where the git metadata travelled stale (a GPU machine gets the
    working tree, not necessarily a current ``.git``): recompute it on a checkout to match."""
    import hashlib

    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha1()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001 - any failure means "not available"
        return None


def copy_bandwidth(device: torch.device) -> float:
    """Bytes per second (read + written) of a 1 GiB device-to-device copy on CUDA, measured now: the
    rate the benchmarks' memory floors use."""
    n = 256 * 2**20  # 1 GiB of fp32
    src = torch.empty(n, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device)
    return 2 * src.numel() * 4 / (ms * 1e-3)


def measure_ceilings(device: torch.device) -> dict[str, float]:
    """Device copy bandwidth (bytes read + written) and bf16 matmul rate, measured now."""
    if device.type != "cuda":
        return {}
    copy_tbps = copy_bandwidth(device) / 1e12
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
    ms = time_ms(lambda: a @ b, device)
    mm_tflops = 2 * 8192**3 / (ms * 1e-3) / 1e12
    return {"copy_tbps": round(copy_tbps, 3), "matmul_bf16_tflops": round(mm_tflops, 1)}


def environment(device: torch.device, *, ceilings: bool = True) -> dict[str, object]:
    from kimi_linear import __version__

    env: dict[str, object] = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "kimi_linear": __version__,
        "commit": _git_commit(),
        "src_sha": source_hash(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "fla": _version("fla"),
        "device": str(device),
    }
    if device.type == "cuda":
        prop = torch.cuda.get_device_properties(device)
        env.update(gpu=prop.name, sms=prop.multi_processor_count, cuda=torch.version.cuda)
        if ceilings:
            env.update(measure_ceilings(device))
    else:
        env["gpu"] = None
    return env


def floor_ms(flop: float, nbytes: float, env: dict[str, object]) -> float:
    """The physical floor: the larger of bytes / copy bandwidth and FLOPs / matmul rate."""
    bw = float(env.get("copy_tbps") or ANCHOR_COPY_TBPS) * 1e12
    mm = float(env.get("matmul_bf16_tflops") or ANCHOR_MATMUL_TFLOPS) * 1e12
    return max(nbytes / bw, flop / mm) * 1e3


def format_table(records: Sequence[Record], columns: Sequence[tuple[str, Callable[[Record], str]]]) -> str:
    rows = [[title for title, _ in columns]] + [[fn(r) for _, fn in columns] for r in records]
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(records: Sequence[Record], columns: Sequence[tuple[str, Callable[[Record], str]]]) -> str:
    head = "| " + " | ".join(t for t, _ in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(fn(r) for _, fn in columns) + " |" for r in records]
    return "\n".join([head, sep, *body])


def fmt(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "-"
    if x == 0 or abs(x) >= 10 ** (digits - 1):
        return f"{x:.{max(0, digits - 2)}f}" if abs(x) < 1e6 else f"{x:.3g}"
    return f"{x:.{digits}g}"


def json_line(bench: str, env: dict[str, object], records: Sequence[Record]) -> str:
    return json.dumps({"bench": bench, "env": env, "results": [asdict(r) for r in records]}, sort_keys=False)


def run_tag(env: dict[str, object]) -> str:
    """``<gpu>_<UTC stamp>``, e.g. ``h100_20261122-113000`` (``cpu_...`` without a GPU)."""
    gpu = str(env.get("gpu") or "cpu")
    short = next((n for n in ("H100", "H200", "B200", "A100", "L40S") if n in gpu), None)
    if short is None:
        short = "".join(ch for ch in gpu.split()[-1] if ch.isalnum()) or "gpu"
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{short.lower()}_{stamp}"


def record_line(bench: str, env: dict[str, object], record: Record) -> str:
    return json.dumps({"bench": bench, "env": env, **asdict(record)})


class JsonlWriter:
    """Appends each record to ``{bench}_{tag}.partial.jsonl`` as it is measured (a run that is cut
    short keeps its rows); :func:`write_results` writes the final ``.jsonl`` and drops the partial file."""

    def __init__(self, out_dir: str | os.PathLike, bench: str, tag: str, env: dict[str, object]) -> None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        self.path = Path(out_dir) / f"{bench}_{tag}.partial.jsonl"
        self.path.write_text("")
        self.bench, self.env = bench, env

    def __call__(self, record: Record) -> None:
        with open(self.path, "a") as f:
            f.write(record_line(self.bench, self.env, record) + "\n")


def write_results(out_dir: str | os.PathLike, bench: str, tag: str, env: dict[str, object],
                  records: Sequence[Record], markdown: str) -> dict[str, str]:
    """Write ``{bench}_{tag}.jsonl`` (one record per line, env inlined) and ``.md``; return paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = out / f"{bench}_{tag}"
    with open(base.with_suffix(".jsonl"), "w") as f:
        for r in records:
            f.write(record_line(bench, env, r) + "\n")
    base.with_suffix(".md").write_text(markdown)
    partial = out / f"{bench}_{tag}.partial.jsonl"
    if partial.exists():
        partial.unlink()
    return {"jsonl": str(base.with_suffix(".jsonl")), "md": str(base.with_suffix(".md"))}


def read_jsonl(paths: Sequence[str | os.PathLike]) -> tuple[list[dict[str, object]], list[Record]]:
    """Records (and the env of each) from JSONL files written by :func:`write_results`."""
    envs, records = [], []
    names = {f.name for f in Record.__dataclass_fields__.values()}
    for p in paths:
        for line in Path(p).read_text().splitlines():
            if not line.strip():
                continue
            d = json.loads(line)
            envs.append(d.get("env", {}))
            records.append(Record(**{k: v for k, v in d.items() if k in names}))
    return envs, records
