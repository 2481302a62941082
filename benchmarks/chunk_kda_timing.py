"""Quick timing of our Triton ``chunk_kda`` (fwd, fwd+bwd) at the paper's Figure-2 grid.

B=1, H=16, K=V=128, bf16, pre-computed log-decay (the Figure-2 setting), and the layer's fused
setting (raw gate + A_log/dt_bias, q/k L2 norm, beta sigmoid). A correctness gate against the fp32
reference runs first; a provider that fails it is not timed. FLA 0.6.0 is timed side by side when
installed and ``--fla`` is given (it autotunes every new shape for a long time: keep the grid small).
The full side-by-side benchmark is ``kimi-linear bench kda``; this script is the kernel author's
quick check. Prints a table, then one JSON line.

    PYTHONPATH=. python benchmarks/chunk_kda_timing.py --T 2048 8192 65536 [--fla]
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F


def make(T: int, H: int, K: int, fused: bool, dtype=torch.bfloat16, device="cuda", seed=0, B: int = 1):
    gen = torch.Generator(device=device).manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, device=device)  # noqa: E731
    q, k, v = r(B, T, H, K), r(B, T, H, K), r(B, T, H, K)
    if fused:
        g, beta = r(B, T, H, K), r(B, T, H)
        extra = dict(A_log=torch.log(torch.rand(H, device=device) * 15 + 1), dt_bias=r(H * K) * 0.5)
    else:
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        g = F.logsigmoid(r(B, T, H, K)) / 16  # a pre-computed log-decay (<= 0)
        beta = torch.rand(B, T, H, device=device, generator=gen)
        extra = {}
    t = dict(q=q, k=k, v=v, g=g, beta=beta)
    return {n: x.to(dtype) for n, x in t.items()}, extra


def ours(inp, extra, fused):
    from kimi_linear.ops.kda.chunk import chunk_kda
    from kimi_linear.ops.kda.fusion import KDAFusion

    fusion = KDAFusion(qk_l2norm=True, beta_sigmoid=True, **extra) if fused else None
    return lambda: chunk_kda(*inp.values(), fusion=fusion, backend="triton")[0]


def fla_provider(inp, extra, fused):
    from fla.ops.kda import chunk_kda as fla_chunk_kda

    if fused:
        return lambda: fla_chunk_kda(*inp.values(), use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True,
                                     use_beta_sigmoid_in_kernel=True, A_log=extra["A_log"], dt_bias=extra["dt_bias"])[0]
    return lambda: fla_chunk_kda(*inp.values())[0]


def gate(make_fn, fused) -> float:
    """Relative RMS error of the provider's o against the fp32 reference at a small size."""
    from kimi_linear.ops.kda.fusion import KDAFusion
    from kimi_linear.ops.kda.reference import chunk_kda_ref

    inp, extra = make(1000, 2, 128, fused, seed=1)
    o = make_fn(inp, extra, fused)().float()
    f32 = {n: x.float() for n, x in inp.items()}
    fusion = KDAFusion(qk_l2norm=True, beta_sigmoid=True, **extra) if fused else None
    ref, _ = chunk_kda_ref(*f32.values(), fusion=fusion)
    return ((o - ref).norm() / ref.norm()).item()


def main() -> None:
    import triton

    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, nargs="+", default=[2048, 4096, 8192, 16384, 32768, 65536])
    ap.add_argument("--H", type=int, default=16)
    ap.add_argument("--fla", action="store_true")
    ap.add_argument("--settings", nargs="+", default=["logdecay", "fused"])
    args = ap.parse_args()
    providers = {"ours": ours}
    if args.fla:
        try:
            import fla  # noqa: F401

            providers["fla"] = fla_provider
        except ImportError:
            print("FLA not installed; timing ours only")
    rows = []
    for setting in args.settings:
        fused = setting == "fused"
        for name, mk in providers.items():
            err = gate(mk, fused)
            if not err <= 1.6e-2:
                print(f"{name} {setting}: FAILED the correctness gate (rel RMS {err:.2e}); not timed")
                continue
            for T in args.T:
                inp, extra = make(T, args.H, 128, fused)
                f = mk(inp, extra, fused)
                fwd = triton.testing.do_bench(f, warmup=50, rep=200, return_mode="median")
                for x in list(inp.values()) + list(extra.values()):
                    x.requires_grad_(True)
                do = torch.randn(1, T, args.H, 128, device="cuda", dtype=torch.bfloat16)
                fb = triton.testing.do_bench(lambda f=f, do=do: f().backward(do), warmup=50, rep=200, return_mode="median",
                                             grad_to_none=list(inp.values()) + list(extra.values()))
                rows.append(dict(provider=name, setting=setting, B=1, T=T, H=args.H, K=128, fwd_ms=round(fwd, 4),
                                 fwdbwd_ms=round(fb, 4), gate_err=err))
                print(f"{name:5s} {setting:8s} T={T:6d}  fwd {fwd:8.3f} ms  fwd+bwd {fb:8.3f} ms  (gate err {err:.1e})",
                      flush=True)
    print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                      "triton": triton.__version__, "rows": rows}))


if __name__ == "__main__":
    main()
