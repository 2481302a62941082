"""Benchmark providers: one entry per implementation, each with an availability check.

A provider takes the inputs of one *setting* (made by the benchmark, the same tensors for every
provider of that setting) and says how to run on them and what our reference says they should give:

| setting     | inputs (leaves)                                                              |
|-------------|------------------------------------------------------------------------------|
| ``kda``     | q, k [B,T,H,K] (k, q L2-normalised), v [B,T,H,V], g [B,T,H,K] log-decay, beta [B,T,H] (paper Figure 2) |
| ``kda_layer``| raw q, k, v, raw gate g [B,T,H,K], beta logits [B,T,H], A_log [H], dt_bias [H*K] fp32 (as the layer calls it) |
| ``gdn``     | as ``kda`` but g [B,T,H] (one decay per head)                                |
| ``attention``| q, k, v [B,T,H,D] (causal softmax attention)                               |
| ``decode``  | one token per sequence, fused raw inputs, a state pool [P,H,K,V] fp32 and slot indices |

``prepare`` maps the leaves to the provider's own arguments (differentiably, so a gate can take
gradients with respect to the leaves); ``run`` calls the implementation; ``reference`` computes the
expected output from fp32 copies of the leaves with our references (:mod:`kimi_linear.ops`).
References are imported, never redefined here.
"""

from __future__ import annotations

import importlib
import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

Leaves = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Provider:
    name: str
    setting: str
    description: str
    available: Callable[[torch.device], str | None]  # None when usable, else why not
    prepare: Callable[[Leaves], Leaves]
    run: Callable[[Leaves], torch.Tensor]
    reference: Callable[[Leaves], torch.Tensor]
    ours: bool = False


# ------------------------------------------------------------------------------------------------
# availability
# ------------------------------------------------------------------------------------------------


def _needs_cuda(device: torch.device) -> str | None:
    return None if device.type == "cuda" else "needs a CUDA device"


def _ours_available(device: torch.device) -> str | None:
    from kimi_linear.backends import triton_usable_on

    if not triton_usable_on(device):
        return f"Triton cannot run on {device} here"
    return None


def fla_module(name: str):
    """Import an FLA module with its own Triton path forced (no optional CUDA backends)."""
    os.environ.setdefault("FLA_DISABLE_BACKEND_DISPATCH", "1")
    return importlib.import_module(name)


def _fla_available(module: str) -> Callable[[torch.device], str | None]:
    def check(device: torch.device) -> str | None:
        if (why := _needs_cuda(device)) is not None:
            return why
        try:
            fla = fla_module("fla")
            fla_module(module)
        except Exception as exc:  # noqa: BLE001 - report any import failure
            return f"fla not importable ({type(exc).__name__}: {exc})"
        if getattr(fla, "__version__", None) != "0.6.0":
            return f"fla {getattr(fla, '__version__', '?')} installed; the comparison pins 0.6.0"
        return None

    return check


def _always(device: torch.device) -> str | None:
    return None


# ------------------------------------------------------------------------------------------------
# references (fp32 leaves in, o out; differentiable)
# ------------------------------------------------------------------------------------------------


def _ref_kda(x: Leaves) -> torch.Tensor:
    from kimi_linear.ops.kda import chunk_kda_ref

    return chunk_kda_ref(x["q"], x["k"], x["v"], x["g"], x["beta"])[0]


def _ref_kda_recurrent64(x: Leaves) -> torch.Tensor:
    from kimi_linear.ops.kda import recurrent_kda_ref

    d = {k: v.double() for k, v in x.items()}
    return recurrent_kda_ref(d["q"], d["k"], d["v"], d["g"], d["beta"])[0]


def _fusion(x: Leaves):
    from kimi_linear.ops.kda import KDAFusion

    return KDAFusion(qk_l2norm=True, beta_sigmoid=True, A_log=x["A_log"], dt_bias=x["dt_bias"])


def _ref_kda_layer(x: Leaves) -> torch.Tensor:
    from kimi_linear.ops.kda import chunk_kda_ref

    return chunk_kda_ref(x["q"], x["k"], x["v"], x["g"], x["beta"], fusion=_fusion(x))[0]


SAFE_LOWER_BOUND = -5.0


def _ref_kda_safe(x: Leaves) -> torch.Tensor:
    """FLA's bounded gate: ``lower_bound * sigmoid(exp(A_log) * (g + dt_bias))``, then KDA."""
    from kimi_linear.ops.kda import KDAFusion, chunk_kda_ref

    H, K = x["g"].shape[-2:]
    g = SAFE_LOWER_BOUND * torch.sigmoid(x["A_log"].reshape(H, 1).exp() * (x["g"].float() + x["dt_bias"].reshape(H, K)))
    return chunk_kda_ref(x["q"], x["k"], x["v"], g, x["beta"], fusion=KDAFusion(qk_l2norm=True, beta_sigmoid=True))[0]


def _ref_gdn(x: Leaves) -> torch.Tensor:
    from kimi_linear.ops.kda import chunk_gdn_ref

    return chunk_gdn_ref(x["q"], x["k"], x["v"], x["g"], x["beta"])[0]


def _ref_attention(x: Leaves, block: int = 1024) -> torch.Tensor:
    """Exact causal softmax attention in the leaves' dtype, ``block`` query rows at a time (O(block*T) memory)."""
    q, k, v = (t.transpose(1, 2) for t in (x["q"], x["k"], x["v"]))  # [B, H, T, D]
    T, D = q.shape[2], q.shape[3]
    outs = []
    for s in range(0, T, block):
        e = min(s + block, T)
        scores = (q[:, :, s:e] @ k[:, :, :e].transpose(-1, -2)) / math.sqrt(D)
        causal = torch.ones(e - s, e, dtype=torch.bool, device=q.device).tril(diagonal=s)
        scores = scores.masked_fill(~causal, float("-inf"))
        outs.append(torch.softmax(scores, dim=-1) @ v[:, :, :e])
    return torch.cat(outs, dim=2).transpose(1, 2)


# ------------------------------------------------------------------------------------------------
# runners
# ------------------------------------------------------------------------------------------------


def _identity(x: Leaves) -> Leaves:
    return x


def _run_ours(x: Leaves) -> torch.Tensor:
    from kimi_linear.ops.kda.chunk import chunk_kda

    return chunk_kda(x["q"], x["k"], x["v"], x["g"], x["beta"], backend="triton")[0]


def _run_ours_layer(x: Leaves) -> torch.Tensor:
    from kimi_linear.ops.kda.chunk import chunk_kda

    return chunk_kda(x["q"], x["k"], x["v"], x["g"], x["beta"], fusion=_fusion(x), backend="triton")[0]


def _run_reference(x: Leaves) -> torch.Tensor:
    from kimi_linear.ops.kda import chunk_kda_ref

    return chunk_kda_ref(x["q"], x["k"], x["v"], x["g"], x["beta"])[0]


def _run_fla_kda(x: Leaves) -> torch.Tensor:
    return fla_module("fla.ops.kda").chunk_kda(x["q"], x["k"], x["v"], x["g"], x["beta"])[0]


def _run_fla_kda_layer(x: Leaves, safe: bool = False) -> torch.Tensor:
    kw = dict(safe_gate=True, lower_bound=SAFE_LOWER_BOUND) if safe else {}
    return fla_module("fla.ops.kda").chunk_kda(
        x["q"], x["k"], x["v"], x["g"], x["beta"], A_log=x["A_log"], dt_bias=x["dt_bias"],
        use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True, use_beta_sigmoid_in_kernel=True, **kw,
    )[0]


def _run_fla_gdn(x: Leaves) -> torch.Tensor:
    return fla_module("fla.ops.gated_delta_rule").chunk_gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"])[0]


def _prepare_dplr(x: Leaves) -> Leaves:
    """KDA as a diagonal-plus-low-rank recurrence (FLA's ``S <- exp(gk) S + k v^T + b (a^T S)``).

    KDA: ``S <- D S - beta k (k^T D S) + beta k v^T`` with ``D = Diag(exp(g))``, so
    ``a = exp(g) * k`` (``a^T S = k^T D S``), ``b = -beta k``, keys ``beta k``, ``gk = g``.
    """
    beta = x["beta"].unsqueeze(-1).to(torch.float32)
    k32 = x["k"].to(torch.float32)
    dt = x["q"].dtype
    return {
        "q": x["q"], "v": x["v"], "gk": x["g"],
        "k": (beta * k32).to(dt),
        "a": (torch.exp(x["g"].to(torch.float32)) * k32).to(dt),
        "b": (-beta * k32).to(dt),
    }


def _run_fla_dplr(x: Leaves) -> torch.Tensor:
    mod = fla_module("fla.ops.generalized_delta_rule")
    return mod.chunk_dplr_delta_rule(x["q"], x["k"], x["v"], x["a"], x["b"], x["gk"])[0]


def _prepare_attention(x: Leaves) -> Leaves:
    return {k: v.transpose(1, 2) for k, v in x.items()}  # [B, H, T, D] views for SDPA


def _run_sdpa(x: Leaves) -> torch.Tensor:
    return torch.nn.functional.scaled_dot_product_attention(x["q"], x["k"], x["v"], is_causal=True).transpose(1, 2)


KDA_PROVIDERS: dict[str, Provider] = {
    p.name: p
    for p in [
        Provider("ours", "kda", "our chunk_kda (Triton), pre-computed log-decay", _ours_available,
                 _identity, _run_ours, _ref_kda, ours=True),
        Provider("ours_fused", "kda_layer", "our chunk_kda (Triton) with in-kernel q/k L2 norm, softplus gate, beta sigmoid",
                 _ours_available, _identity, _run_ours_layer, _ref_kda_layer, ours=True),
        Provider("fla_kda", "kda", "FLA 0.6.0 chunk_kda, exact default path, pre-computed log-decay",
                 _fla_available("fla.ops.kda"), _identity, _run_fla_kda, _ref_kda),
        Provider("fla_kda_fused", "kda_layer", "FLA 0.6.0 chunk_kda default (exact) path, in-kernel norm/gate/beta",
                 _fla_available("fla.ops.kda"), _identity, _run_fla_kda_layer, _ref_kda_layer),
        Provider("fla_kda_safe", "kda_layer", "FLA 0.6.0 chunk_kda bounded-gate path (safe_gate, lower_bound=-5)",
                 _fla_available("fla.ops.kda"), _identity, lambda x: _run_fla_kda_layer(x, safe=True), _ref_kda_safe),
        Provider("fla_gdn", "gdn", "FLA 0.6.0 chunk_gated_delta_rule (one decay per head)",
                 _fla_available("fla.ops.gated_delta_rule"), _identity, _run_fla_gdn, _ref_gdn),
        Provider("fla_dplr", "kda", "FLA 0.6.0 chunk_dplr_delta_rule computing KDA as general DPLR",
                 _fla_available("fla.ops.generalized_delta_rule"), _prepare_dplr, _run_fla_dplr, _ref_kda),
        Provider("flash", "attention", "PyTorch SDPA causal (flash attention on bf16 CUDA)",
                 _needs_cuda, _prepare_attention, _run_sdpa, _ref_attention),
        Provider("reference", "kda", "our PyTorch chunk_kda_ref (smoke / CPU); gated against recurrent_kda_ref in fp64",
                 _always, _identity, _run_reference, _ref_kda_recurrent64),
    ]
}

# Providers run by default (the reference is for smoke runs: it is far too slow at real sizes).
DEFAULT_KDA_PROVIDERS = ("ours", "ours_fused", "fla_kda", "fla_kda_fused", "fla_kda_safe", "fla_gdn", "fla_dplr", "flash")


# ------------------------------------------------------------------------------------------------
# decode providers: inputs {q, k, v, g, beta, A_log, dt_bias, pool, idx}; run updates pool in place
# ------------------------------------------------------------------------------------------------


def _run_decode_ours(x: Leaves, **tile) -> torch.Tensor:
    from kimi_linear.ops.kda import KDAFusion
    from kimi_linear.ops.kda.recurrent import recurrent_kda

    fusion = KDAFusion(qk_l2norm=True, beta_sigmoid=True, A_log=x["A_log"], dt_bias=x["dt_bias"])
    if tile:  # a tile sweep goes through the launcher directly
        from kimi_linear.ops.kda.contract import check_kda_inputs
        from kimi_linear.ops.kda.recurrent import _recurrent_triton

        shape = check_kda_inputs(x["q"], x["k"], x["v"], x["g"], x["beta"], gate_is_log_decay=False, check_values=False)
        return _recurrent_triton(x["q"], x["k"], x["v"], x["g"], x["beta"], shape=shape, scale=shape.K**-0.5,
                                 initial_state=x["pool"], output_final_state=False, cu_seqlens=None, fusion=fusion,
                                 state_indices=x["idx"], **tile)[0]
    return recurrent_kda(x["q"], x["k"], x["v"], x["g"], x["beta"], fusion=fusion, initial_state=x["pool"],
                         state_indices=x["idx"], backend="triton")[0]


def _run_decode_fla(x: Leaves) -> torch.Tensor:
    mod = fla_module("fla.ops.kda.fused_recurrent")
    return mod.fused_recurrent_kda_fwd(
        x["q"], x["k"], x["v"], x["g"], x["beta"], A_log=x["A_log"], dt_bias=x["dt_bias"],
        initial_state=x["pool"], inplace_final_state=True, ssm_state_indices=x["idx"],
        use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True, use_beta_sigmoid_in_kernel=True,
    )[0]


def _run_decode_reference(x: Leaves) -> torch.Tensor:
    from kimi_linear.ops.kda import KDAFusion
    from kimi_linear.ops.kda.recurrent import recurrent_kda

    fusion = KDAFusion(qk_l2norm=True, beta_sigmoid=True, A_log=x["A_log"], dt_bias=x["dt_bias"])
    return recurrent_kda(x["q"], x["k"], x["v"], x["g"], x["beta"], fusion=fusion, initial_state=x["pool"],
                         state_indices=x["idx"], backend="reference")[0]


def _fla_decode_available(device: torch.device) -> str | None:
    return _fla_available("fla.ops.kda.fused_recurrent")(device)


DECODE_PROVIDERS: dict[str, Provider] = {
    p.name: p
    for p in [
        Provider("ours", "decode", "our recurrent_kda (Triton), fused norm/gate/beta, pool updated in place",
                 _ours_available, _identity, _run_decode_ours, _run_decode_reference, ours=True),
        Provider("fla", "decode", "FLA 0.6.0 fused_recurrent_kda (in-place pool via ssm_state_indices, fused options)",
                 _fla_decode_available, _identity, _run_decode_fla, _run_decode_reference),
        Provider("reference", "decode", "our PyTorch reference (smoke / CPU)",
                 _always, _identity, _run_decode_reference, _run_decode_reference),
    ]
}
DEFAULT_DECODE_PROVIDERS = ("ours", "fla")


def tile_variant(BV: int, num_warps: int) -> Provider:
    """Our decode kernel with a forced tile, for the sweep that picks the default tile."""
    base = DECODE_PROVIDERS["ours"]
    return Provider(f"ours[BV={BV},w={num_warps}]", "decode", f"{base.description}; BV={BV}, num_warps={num_warps}",
                    base.available, _identity, lambda x: _run_decode_ours(x, BV=BV, num_warps=num_warps),
                    base.reference, ours=True)
