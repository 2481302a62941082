"""Mixture-of-experts routing and grouped expert compute (the Kimi Linear / DeepSeek-V3 scheme).

Routing (:func:`route`): sigmoid scores from fp32 router logits; experts are *chosen* on
``score + correction_bias`` (the auxiliary-loss-free balancing bias, optionally inside the best
expert groups), but *weighted* by the unbiased scores, renormalised to sum 1 and multiplied by
``scaling``.

Expert compute (:func:`grouped_swiglu`): the (token, slot) pairs are sorted by expert so each
active expert runs one GEMM over exactly its tokens; cost scales with the routed tokens, not with
the number of experts. At inference on CUDA (bf16) the experts' GEMMs are grouped into one launch per
projection (``torch._grouped_mm``, no host sync); training keeps one GEMM per expert.

| tensor        | shape          | notes                                  |
|---------------|----------------|----------------------------------------|
| logits        | ``[N, E]``     | N tokens, E experts (fp32)             |
| weights       | ``[N, k]``     | fp32 combine weights                   |
| indices       | ``[N, k]``     | int64 expert ids                       |
| x             | ``[N, D]``     |                                        |
| w1, w3        | E x ``[I, D]`` | gate / up projections (nn.Linear layout) |
| w2            | E x ``[D, I]`` | down projection                        |
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from kimi_linear.backends import resolve_backend
from kimi_linear.ops.norm import rms_norm

__all__ = ["route", "route_tokens", "expert_load", "grouped_swiglu", "stacked_view"]


def _check_route_args(E: int, device: torch.device, correction_bias: torch.Tensor | None, top_k: int,
                      num_groups: int, topk_groups: int) -> None:
    """The checks :func:`route` and :func:`route_tokens` share, for ``E`` experts on ``device``."""
    if not 1 <= top_k <= E:
        raise ValueError(f"top_k must be in [1, E={E}], got {top_k}")
    if num_groups < 1 or E % num_groups != 0 or not 1 <= topk_groups <= num_groups:
        raise ValueError(f"need E % num_groups == 0 and 1 <= topk_groups <= num_groups; got E={E}, "
                         f"num_groups={num_groups}, topk_groups={topk_groups}")
    if correction_bias is not None and (correction_bias.shape != (E,) or correction_bias.device != device):
        raise ValueError(f"correction_bias must be [E={E}] on {device}, "
                         f"got {tuple(correction_bias.shape)} on {correction_bias.device}")


def route(
    logits: torch.Tensor,
    correction_bias: torch.Tensor | None,
    top_k: int,
    *,
    num_groups: int = 1,
    topk_groups: int = 1,
    renormalize: bool = True,
    scaling: float = 1.0,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose ``top_k`` experts per token. Returns ``(weights [N, k] fp32, indices [N, k] int64)``.

    Slots come unsorted. Without expert groups and without a gradient to carry (inference), the
    Triton backend does it in one launch (:mod:`kimi_linear.ops.moe_route_kernel`)."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be [N, E], got shape {tuple(logits.shape)}")
    N, E = logits.shape
    _check_route_args(E, logits.device, correction_bias, top_k, num_groups, topk_groups)
    chosen = resolve_backend(backend, logits.device)
    grouped = num_groups > 1 and topk_groups < num_groups
    needs_grad = torch.is_grad_enabled() and logits.requires_grad
    if not grouped and not needs_grad and logits.dtype != torch.float64 and chosen == "triton":
        from kimi_linear.ops.moe_route_kernel import route_triton

        return route_triton(logits, correction_bias, top_k, renormalize, scaling)
    scores = torch.sigmoid(logits.float())
    choice = scores if correction_bias is None else scores + correction_bias.float()
    if grouped:
        per_group = E // num_groups
        grouped = choice.view(N, num_groups, per_group)
        group_score = grouped.topk(min(2, per_group), dim=-1).values.sum(-1)  # [N, groups]
        keep = torch.zeros_like(group_score, dtype=torch.bool)
        keep.scatter_(1, group_score.topk(topk_groups, dim=-1).indices, True)
        choice = choice.masked_fill(~keep.repeat_interleave(per_group, dim=1), float("-inf"))
    # unsorted: the slots' order does not matter (weights travel with their indices), and on CUDA
    # sorting costs a second kernel per MoE layer in every decode step
    indices = choice.topk(top_k, dim=-1, sorted=False).indices
    weights = scores.gather(1, indices)
    if renormalize:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * scaling, indices


ROUTE_IN_KERNEL_MAX_TOKENS = 64
# ... and at most this many experts: one program per token reads the whole [E, D] router weight, which
# was measured to win at E = 16 (6.6 us against 10.8 for cuBLAS + routing, H100); at the released
# model's 256 experts one SM would read 1.2 MB per token while a GEMV spreads it over the GPU. Up to 32
# the kernel compiles without spills for sm_90a (benchmarks/kernel_resources.py; 64 spills).
ROUTE_IN_KERNEL_MAX_EXPERTS = 32


def route_tokens(
    x: torch.Tensor,
    gate_weight: torch.Tensor,
    correction_bias: torch.Tensor | None,
    top_k: int,
    *,
    num_groups: int = 1,
    topk_groups: int = 1,
    renormalize: bool = True,
    scaling: float = 1.0,
    backend: str = "auto",
    scratch: Any = None,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`route` of the router logits ``x.float() @ gate_weight.float().T`` (``x [N, D]``,
    ``gate_weight [E, D]``). At inference on Triton (no groups, no gradient, at most
    ``ROUTE_IN_KERNEL_MAX_TOKENS`` tokens and ``ROUTE_IN_KERNEL_MAX_EXPERTS`` experts) one launch
    computes the logits and the choice (split over several programs per token when the caller passes
    its ``moe_route_kernel.RouterScratch``); otherwise
    the logits come from ``F.linear`` in fp32, then :func:`route`.

    ``norm_weight [D]``: route ``rms_norm(x, norm_weight, eps)`` instead of x (the split router folds
    the norm into its programs; every other path normalises first)."""
    if x.dim() != 2 or gate_weight.dim() != 2 or x.shape[1] != gate_weight.shape[1]:
        raise ValueError(f"need x [N, D] and gate_weight [E, D], got {tuple(x.shape)} and {tuple(gate_weight.shape)}")
    if gate_weight.device != x.device:
        raise ValueError(f"gate_weight must be on x's device {x.device}, got {gate_weight.device}")
    if norm_weight is not None and (norm_weight.shape != (x.shape[1],) or norm_weight.device != x.device):
        raise ValueError(f"norm_weight must be [D={x.shape[1]}] on x's device {x.device}, "
                         f"got {tuple(norm_weight.shape)} on {norm_weight.device}")
    _check_route_args(gate_weight.shape[0], x.device, correction_bias, top_k, num_groups, topk_groups)
    fused = (
        # one program per token reads the whole router weight: right for a decode step's few tokens; a
        # prefill's thousands are better served by one GEMM (measured on an H100: 2.9 ms per 4K-token prefill)
        x.shape[0] <= ROUTE_IN_KERNEL_MAX_TOKENS and gate_weight.shape[0] <= ROUTE_IN_KERNEL_MAX_EXPERTS
        and resolve_backend(backend, x.device) == "triton" and not (num_groups > 1 and topk_groups < num_groups)
        and not (torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                                 for t in (x, gate_weight, norm_weight)))
        and x.dtype != torch.float64
    )
    if fused:
        from kimi_linear.ops.moe_route_kernel import route_triton

        return route_triton(None, correction_bias, top_k, renormalize, scaling, hidden=(x, gate_weight),
                            scratch=scratch, norm_weight=norm_weight, eps=eps)
    if norm_weight is not None:
        x = rms_norm(x, norm_weight, eps, backend=backend)
    return route(F.linear(x.float(), gate_weight.float()), correction_bias, top_k, num_groups=num_groups,
                 topk_groups=topk_groups, renormalize=renormalize, scaling=scaling, backend=backend)


def expert_load(indices: torch.Tensor, num_experts: int, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Tokens routed to each expert, fp32 ``[E]`` (no host sync). ``token_mask [N]`` drops padding."""
    flat = indices.reshape(-1)
    w = None
    if token_mask is not None:
        w = token_mask.reshape(-1, 1).expand_as(indices).reshape(-1).float()
    return torch.bincount(flat, weights=w, minlength=num_experts).float()


# Inference (no gradient) on CUDA in bf16 runs the experts as three grouped GEMMs over the sorted
# slots (torch._grouped_mm, group sizes as device offsets): no host sync and 3 launches per layer instead
# of 3 per active expert. A 4K-token prefill of the decode benchmark's model was host-bound on that loop
# (session 6: 126 ms of aten::mm host time over 26 MoE layers). Training keeps the per-expert loop
# (every expert in the graph for FSDP, and the GEMMs' backward). Switch for A/B runs:
GROUPED_MM = True
GROUPED_MM_MIN_SLOTS = 256  # below this, a decode step's few tokens, the loop's few GEMMs are cheaper


def _grouped_mm_usable(x: torch.Tensor, w1: Sequence[torch.Tensor], w3: Sequence[torch.Tensor],
                       w2: Sequence[torch.Tensor], slots: int, force: bool | None) -> bool:
    if force is not None:
        return force
    if not (GROUPED_MM and hasattr(torch, "_grouped_mm") and x.is_cuda and x.dtype == torch.bfloat16
            and slots >= GROUPED_MM_MIN_SLOTS):
        return False
    # Hopper and newer: where PyTorch's grouped GEMM has its CUTLASS kernels (and where it was measured);
    # older GPUs keep the loop
    if torch.cuda.get_device_capability(x.device) < (9, 0):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in (*w1, *w3, *w2))):
        return False
    I, D = w1[0].shape
    # the grouped GEMM needs every expert of one shape and 16-byte aligned rows
    return (D % 8 == 0 and I % 8 == 0 and all(w.shape == (I, D) for w in (*w1, *w3))
            and all(w.shape == (D, I) for w in w2) and all(w.dtype == x.dtype for w in (*w1, *w3, *w2)))


def stacked_view(parts: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """``parts`` (equal-shape 2-D tensors) as one ``[len(parts) * rows, cols]`` tensor without a copy when
    they lie back to back in one storage (as :meth:`kimi_linear.layers.moe.SparseMoeBlock.pack_experts_`
    lays the experts out); None otherwise."""
    if not parts or not all(isinstance(t, torch.Tensor) and t.dim() == 2 for t in parts):
        return None
    first = parts[0]
    rows, cols = first.shape
    step = rows * cols * first.element_size()
    if not first.is_contiguous():
        return None
    base, storage = first.data_ptr(), first.untyped_storage().data_ptr()
    for i, t in enumerate(parts):
        if (t.shape != first.shape or t.dtype != first.dtype or not t.is_contiguous()
                or t.data_ptr() != base + i * step or t.untyped_storage().data_ptr() != storage):
            return None
    return first.as_strided((len(parts) * rows, cols), (cols, 1))


def _experts_grouped_mm(xs: torch.Tensor, counts: torch.Tensor, slot_weights: torch.Tensor, w1, w3, w2) -> torch.Tensor:
    """``xs [S, D]`` (slots sorted by expert, ``counts [E]`` per expert, ``slot_weights [S]`` their
    combine weights) -> ``[S, D]`` weighted expert outputs. The weight multiplies the down projection's
    input (the product is linear in it), so the combine is a plain sum over each token's slots."""
    I = w1[0].shape[0]
    offs = torch.cumsum(counts, 0).to(torch.int32)
    E, D = len(w1), w1[0].shape[1]
    # [E, 2I, D] gate and up rows stacked, used transposed (column-major per group, as the grouped GEMM
    # takes it): a view of the experts' packed weights (SparseMoeBlock.pack_experts_), else one copy of
    # the weights per call (~0.27 ms per layer at the benchmark's size: 7.3 ms of a 4K prefill's 86)
    interleaved = [t for pair in zip(w1, w3) for t in pair]  # w1[0], w3[0], w1[1], ...
    w13 = stacked_view(interleaved)
    w13 = w13.view(E, 2 * I, D) if w13 is not None else torch.stack([torch.cat([a, b]) for a, b in zip(w1, w3)])
    gu = torch._grouped_mm(xs, w13.transpose(1, 2), offs=offs)  # [S, 2I]
    h = (F.silu(gu[:, :I]) * gu[:, I:] * slot_weights[:, None]).to(xs.dtype)
    w2s = stacked_view(list(w2))
    w2s = w2s.view(E, D, I) if w2s is not None else torch.stack(list(w2))
    return torch._grouped_mm(h, w2s.transpose(1, 2), offs=offs)  # [S, D]


def _experts_loop(xs: torch.Tensor, counts: torch.Tensor, w1, w3, w2) -> torch.Tensor:
    """The same as :func:`_experts_grouped_mm`, one GEMM per active expert (reads the group sizes on the host)."""
    outs = []
    start = 0
    for e, c in enumerate(counts.tolist()):  # one host sync
        if c == 0 and not (torch.is_grad_enabled() and w1[e].requires_grad):
            continue  # training keeps empty experts in the graph (zero grads): FSDP reduces the same set on every rank
        xe = xs[start:start + c]
        h = F.silu(F.linear(xe, w1[e])) * F.linear(xe, w3[e])
        outs.append(F.linear(h, w2[e]))
        start += c
    return torch.cat(outs) if outs else xs.new_zeros(0, w2[0].shape[0])


def grouped_swiglu(
    x: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    w1: Sequence[torch.Tensor],
    w3: Sequence[torch.Tensor],
    w2: Sequence[torch.Tensor],
    *,
    grouped_mm: bool | None = None,
) -> torch.Tensor:
    """``sum_slot weights * w2_e(silu(w1_e x) * w3_e x)`` over each token's chosen experts. Returns ``[N, D]``.

    The combine is accumulated in fp32 and cast to x's dtype once, so bf16 models do not round
    after every expert; each token sums its own k slots (deterministic, no atomic adds).
    ``grouped_mm``: force (True) or forbid (False) the grouped-GEMM path; None picks it for inference
    on CUDA in bf16 (see ``GROUPED_MM``).
    """
    if x.dim() != 2 or indices.shape != weights.shape or indices.shape[0] != x.shape[0]:
        raise ValueError(f"need x [N, D], indices and weights [N, k]; got {tuple(x.shape)}, "
                         f"{tuple(indices.shape)}, {tuple(weights.shape)}")
    E = len(w1)
    N, k = indices.shape
    D = x.shape[1]
    flat = indices.reshape(-1)
    order = torch.argsort(flat, stable=True)
    token_of = order // k  # which token each sorted slot belongs to
    counts = torch.bincount(flat, minlength=E)
    xs = x[token_of]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    slot_weights = weights.reshape(-1)[order].to(acc)
    if _grouped_mm_usable(x, w1, w3, w2, N * k, grouped_mm):
        y = _experts_grouped_mm(xs, counts, slot_weights, w1, w3, w2)  # [N * k, D] sorted slots, weighted
    else:
        y = _experts_loop(xs, counts, w1, w3, w2).to(acc) * slot_weights[:, None]
    # back to (token, slot) order by a gather (in x's dtype on the grouped path), then each token's k slots
    # summed in fp32: an fp32 scatter-add of every slot took ~25 ms of a 4K prefill's GPU time (H100)
    inv = torch.empty_like(order)
    inv[order] = torch.arange(N * k, device=order.device)
    return y[inv].view(N, k, D).sum(1, dtype=acc).to(x.dtype)
