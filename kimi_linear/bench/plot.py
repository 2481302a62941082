"""Plots of benchmark records (matplotlib, headless): Figure 2 redrawn, and decode bandwidth."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from kimi_linear.bench.common import Record


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# One look per provider across every plot (ours solid, peers dashed or dotted), so that figures from
# different runs can be compared at a glance; a provider not listed here gets matplotlib's next colour.
PROVIDER_STYLE: dict[str, dict[str, str]] = {
    "ours": dict(color="tab:blue", linestyle="-", marker="o"),
    "ours_fused": dict(color="tab:cyan", linestyle="-", marker="s"),
    "fla_kda": dict(color="tab:red", linestyle="--", marker="^"),
    "fla_kda_fused": dict(color="tab:pink", linestyle="--", marker="v"),
    "fla_kda_safe": dict(color="tab:orange", linestyle="--", marker="D"),
    "fla_gdn": dict(color="tab:green", linestyle=":", marker="x"),
    "fla_dplr": dict(color="tab:purple", linestyle=":", marker="P"),
    "flash": dict(color="black", linestyle="-.", marker="*"),
    "reference": dict(color="gray", linestyle=":", marker="."),
}


def plot_kda(records: Sequence[Record], path: str | Path, title: str = "") -> str | None:
    """The paper's Figure 2 with every provider: ms against T (B=1, H=16), one panel per mode.

    A run without two Figure 2 lengths (one training shape, or a few unrelated ones) is drawn as bars
    instead: per shape one bar per provider, labelled with its ms, and the KDA floor of that shape as a
    dashed tick (max(bytes / copy bandwidth, FLOPs / matmul rate); flash attention's floor differs and
    is in the table). Returns the written path, or None when nothing was timed.
    """
    timed = [r for r in records if r.ok]
    if not timed:
        return None
    fig2 = [r for r in timed if r.shape["B"] == 1 and r.shape["H"] == 16]
    if len({r.shape["T"] for r in fig2}) < 2:
        fig2 = []
    use = fig2 or timed
    modes = [m for m in ("fwd", "fwdbwd") if any(r.mode == m for r in use)]
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(modes), figsize=(6.5 * len(modes), 4.6), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        rows = [r for r in use if r.mode == mode]
        if fig2:
            _figure2_lines(ax, rows)
        else:
            _shape_bars(ax, rows)
        ax.set_ylabel("ms (median)")
        ax.set_title({"fwd": "forward", "fwdbwd": "forward + backward"}[mode])
    fig.suptitle(title or "KDA kernels (Figure 2 redrawn with every provider)")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def _figure2_lines(ax, rows: Sequence[Record]) -> None:
    """ms against T on log-log axes, one line per provider."""
    for provider in dict.fromkeys(r.provider for r in rows):
        mine = sorted((r for r in rows if r.provider == provider), key=lambda r: r.shape["T"])
        ax.plot([r.shape["T"] for r in mine], [r.ms for r in mine], label=provider,
                **PROVIDER_STYLE.get(provider, {"marker": "o"}))
    ax.set_yscale("log")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length T (B=1, H=16, K=V=128)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)


def _shape_bars(ax, rows: Sequence[Record]) -> None:
    """Grouped bars: per shape one bar per provider (ms written on it), the KDA floor as a dashed tick."""
    def key(r: Record) -> tuple[int, int, int]:
        return r.shape["B"], r.shape["T"], r.shape["H"]

    keys = sorted({key(r) for r in rows})
    providers = list(dict.fromkeys(r.provider for r in rows))
    width = 0.8 / len(providers)
    for i, provider in enumerate(providers):
        mine = [r for r in rows if r.provider == provider]
        xs = [keys.index(key(r)) - 0.4 + (i + 0.5) * width for r in mine]
        ax.bar(xs, [r.ms for r in mine], width, color=PROVIDER_STYLE.get(provider, {}).get("color"), label=provider)
        for x, r in zip(xs, mine):
            ax.annotate(f"{r.ms:.3g}", (x, r.ms), ha="center", va="bottom", fontsize=7)
    for j, k in enumerate(keys):
        floors = [r.floor_ms for r in rows if key(r) == k and r.floor_ms and r.extra.get("setting") in ("kda", "kda_layer")]
        if floors:
            ax.hlines(min(floors), j - 0.45, j + 0.45, colors="gray", linestyles="--", label="KDA floor" if j == 0 else None)
    ax.set_xticks(range(len(keys)), [f"B{b} T{t} H{h}" for b, t, h in keys])
    ax.set_ylim(0, 1.3 * max(r.ms for r in rows))  # headroom for the legend above the bars
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", ncol=3)


def plot_decode(records: Sequence[Record], path: str | Path, copy_tbps: float | None, title: str = "") -> str | None:
    """Achieved bandwidth (state read + write) against batch, with the device copy bandwidth."""
    timed = [r for r in records if r.ok]
    if not timed:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    for provider in dict.fromkeys(r.provider for r in timed):
        rows = sorted((r for r in timed if r.provider == provider), key=lambda r: r.shape["B"])
        style = "-" if "[" not in provider else ":"
        axes[0].plot([r.shape["B"] for r in rows], [r.ms for r in rows], style, marker="o", label=provider)
        axes[1].plot([r.shape["B"] for r in rows], [r.gbps / 1e3 for r in rows], style, marker="o", label=provider)
    if copy_tbps:
        axes[1].axhline(copy_tbps, color="k", linestyle="--", label=f"copy {copy_tbps:.2f} TB/s")
        axes[1].axhline(0.85 * copy_tbps, color="gray", linestyle=":", label="85% of copy")
    for ax, ylabel in zip(axes, ("ms (median)", "TB/s (bytes read + written)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch (sequences, one token each)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_yscale("log")
    fig.suptitle(title or "KDA decode step (recurrent state in place)")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)
