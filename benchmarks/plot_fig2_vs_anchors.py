"""Figure 2 redrawn from our own timing run beside FLA's anchored numbers (a separate run).

Reads the JSON line that ``benchmarks/chunk_kda_timing.py`` prints (kept in
``benchmarks/results/kda/chunk_kda_v3_timing_h100.log``) and draws it against FLA 0.6.0 ``chunk_kda``
(exact path, pre-computed log-decay) as measured in ``../shared/ANCHORS.md`` on the same GPU model and
software versions. The FLA curve is labelled as anchored: it is not a same-run comparison.

    python benchmarks/plot_fig2_vs_anchors.py benchmarks/results/kda/chunk_kda_v3_timing_h100.log out.png
"""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# ../shared/ANCHORS.md, "With a pre-computed log-decay instead (the paper's Figure 2 setting, B=1, H=16)".
ANCHOR_T = [2048, 4096, 8192, 16384, 32768, 65536]
ANCHOR_FLA = {"fwd": [0.65, 0.89, 0.93, 1.35, 2.64, 5.26], "fwdbwd": [3.56, 3.16, 3.19, 6.10, 12.08, 23.95]}
ANCHOR_DPLR_FWD = [0.62, 1.10, 2.16, 4.21, 8.39, 16.71]


def main(log_path: str, out_path: str) -> None:
    line = next(x for x in open(log_path) if x.startswith("{"))
    rows = json.loads(line)["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, mode, title in ((axes[0], "fwd", "forward"), (axes[1], "fwdbwd", "forward + backward")):
        for setting, style in (("logdecay", "o-"), ("fused", "s--")):
            pts = sorted((r["T"], r[f"{mode}_ms"]) for r in rows if r["setting"] == setting)
            label = "ours (log-decay input)" if setting == "logdecay" else "ours (layer-fused gate/norm/beta)"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label)
        ax.plot(ANCHOR_T, ANCHOR_FLA[mode], "^:", color="gray", label="FLA 0.6.0 chunk_kda exact (ANCHORS.md, separate run)")
        if mode == "fwd":
            ax.plot(ANCHOR_T, ANCHOR_DPLR_FWD, "v:", color="silver", label="FLA general DPLR (ANCHORS.md)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length T (B=1, H=16, K=V=128, bf16)")
        ax.set_ylabel("ms (median)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Chunked KDA on {json.loads(line)['device']} (Triton {json.loads(line)['triton']})")
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    main(sys.argv[1], sys.argv[2])
