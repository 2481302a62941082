"""MLP blocks: the dense SwiGLU MLP and the sparse MoE block (router + routed experts + shared expert).

Checkpoint names: dense ``mlp.{gate,up,down}_proj``; MoE ``block_sparse_moe.gate.weight``,
``block_sparse_moe.gate.e_score_correction_bias``, ``block_sparse_moe.experts.E.{w1,w2,w3}``
(w1 = gate, w3 = up, w2 = down) and ``block_sparse_moe.shared_experts.{gate,up,down}_proj``.

Load balancing is auxiliary-loss free (DeepSeek-V3): the router picks experts on
``sigmoid(logits) + e_score_correction_bias`` and the trainer nudges the bias after each step with
:meth:`SparseMoeBlock.update_correction_bias`, using the per-expert load the forward accumulated in
``expert_load`` (a device tensor; no host sync in the forward for it).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kimi_linear.layers.common import KeepFP32
from kimi_linear.ops.moe import expert_load, grouped_swiglu, route_tokens

__all__ = ["SwiGLUMLP", "Expert", "MoEGate", "SparseMoeBlock"]


class SwiGLUMLP(nn.Module):
    """``down_proj(silu(gate_proj(x)) * up_proj(x))``."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Expert(nn.Module):
    """One routed expert: ``w2(silu(w1 x) * w3 x)`` (weights only; the block computes experts grouped)."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.w2 = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.w3 = nn.Linear(hidden_size, intermediate_size, bias=False)


class MoEGate(KeepFP32):
    """Router weight ``[E, D]`` and the fp32 balancing bias ``e_score_correction_bias [E]`` (weights only:
    :func:`kimi_linear.ops.moe.route_tokens` computes the fp32 logits, inside its kernel at decode time)."""

    _keep_fp32 = ("e_score_correction_bias",)

    def __init__(self, hidden_size: int, num_experts: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(num_experts, dtype=torch.float32))
        nn.init.normal_(self.weight, std=0.02)


class SparseMoeBlock(nn.Module):
    """Routed experts (top-k of E) plus the always-on shared expert(s).

    | forward arg     | shape                           |
    |-----------------|---------------------------------|
    | hidden_states   | ``[B, T, D]``                   |
    | attention_mask  | ``[B, T]`` or None (only to keep pads out of the load statistics) |
    | return          | ``[B, T, D]``                   |
    """

    def __init__(self, config: Any) -> None:
        super().__init__()
        D = config.hidden_size
        self.num_experts = E = config.num_experts
        self.top_k = config.num_experts_per_token
        self.renormalize = config.moe_renormalize
        self.scaling = config.routed_scaling_factor
        grouped = bool(config.use_grouped_topk)
        self.num_groups = config.num_expert_group if grouped else 1
        self.topk_groups = config.topk_group if grouped else 1
        self.gate = MoEGate(D, E)
        self.experts = nn.ModuleList([Expert(D, config.moe_intermediate_size) for _ in range(E)])
        self.shared_experts = (
            SwiGLUMLP(D, config.moe_intermediate_size * config.num_shared_experts) if config.num_shared_experts else None
        )
        # Tokens routed to each expert since the last bias update (not saved in checkpoints).
        self.register_buffer("expert_load", torch.zeros(E, dtype=torch.float32), persistent=False)
        self.track_load = True
        # the split router's partial logits and counters for this layer (decode; not a checkpoint entry)
        self.router_scratch = None

    def route(self, x: torch.Tensor, backend: str = "auto", *, norm_weight: torch.Tensor | None = None,
              eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [N, D]`` -> ``(weights [N, k] fp32, indices [N, k])``; with ``norm_weight [D]`` the routing
        of ``rms_norm(x, norm_weight, eps)`` (folded into the split router at decode time)."""
        # logits x . W^T in fp32; on Triton at inference the routing kernel computes them itself
        if self.router_scratch is None and x.is_cuda:
            try:
                from kimi_linear.ops.moe_route_kernel import RouterScratch
            except ImportError:  # no Triton: the PyTorch route, nothing to keep
                self.router_scratch = False
            else:
                self.router_scratch = RouterScratch()
        return route_tokens(x, self.gate.weight, self.gate.e_score_correction_bias, self.top_k,
                            num_groups=self.num_groups, topk_groups=self.topk_groups, renormalize=self.renormalize,
                            scaling=self.scaling, backend=backend, scratch=self.router_scratch or None,
                            norm_weight=norm_weight, eps=eps)

    def reset_buffers(self) -> None:
        """Fill the non-persistent buffers (not in a checkpoint; garbage after ``to_empty``)."""
        self.expert_load.zero_()

    @torch.no_grad()
    def pack_experts_(self) -> bool:
        """Move the routed experts' weights into two buffers, ``[E, 2I, D]`` (each expert's w1 rows, then
        its w3 rows) and ``[E, D, I]`` (the w2s), each expert's parameters becoming views of them. The
        grouped-GEMM path (:func:`kimi_linear.ops.moe.grouped_swiglu`, inference on CUDA) then reads the
        weights in place instead of stacking a copy per call. Values, parameter names and the checkpoint
        format do not change; memory is the same once the old tensors are freed. Call it before capturing
        CUDA graphs (a captured graph keeps the old addresses) and after any ``.to(device / dtype)`` (which
        makes new, separate tensors: still correct, the grouped path then stacks a copy again). Returns
        False (nothing done) when the experts differ in shape, dtype or device, or are already packed."""
        w1 = [e.w1.weight for e in self.experts]
        w3 = [e.w3.weight for e in self.experts]
        w2 = [e.w2.weight for e in self.experts]
        first = w1[0]
        same = all(w.shape == first.shape and w.dtype == first.dtype and w.device == first.device for w in (*w1, *w3))
        same = same and all(w.shape == w2[0].shape and w.dtype == first.dtype and w.device == first.device for w in w2)
        if not same or first.is_meta:
            return False
        from kimi_linear.ops.moe import stacked_view

        if stacked_view([t for pair in zip(w1, w3) for t in pair]) is not None and stacked_view(w2) is not None:
            return False
        E, (I, D) = len(w1), first.shape
        buf13 = torch.empty(E, 2 * I, D, dtype=first.dtype, device=first.device)
        buf2 = torch.empty(E, D, I, dtype=first.dtype, device=first.device)
        for e in range(E):
            buf13[e, :I].copy_(w1[e])
            buf13[e, I:].copy_(w3[e])
            buf2[e].copy_(w2[e])
            w1[e].data, w3[e].data, w2[e].data = buf13[e, :I], buf13[e, I:], buf2[e]
        return True

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                **kwargs: Any) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        weights, indices = self.route(x)
        if self.track_load and self.training and kwargs.get("count_load", True):
            with torch.no_grad():
                tm = None if attention_mask is None else attention_mask.reshape(-1)
                self.expert_load += expert_load(indices, self.num_experts, tm)
        y = grouped_swiglu(x, indices, weights,
                           [e.w1.weight for e in self.experts], [e.w3.weight for e in self.experts],
                           [e.w2.weight for e in self.experts])
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y.view(shape)

    @torch.no_grad()
    def update_correction_bias(self, rate: float, load: torch.Tensor | None = None) -> torch.Tensor:
        """Auxiliary-loss-free balancing step: ``bias += rate * sign(mean(load) - load)``.

        ``load [E]`` defaults to the ``expert_load`` accumulated since the last call (sum it over
        data-parallel ranks first when training distributed). Resets ``expert_load``; returns the
        load used. Overloaded experts get a lower bias, so the router picks them less often.
        """
        load = self.expert_load.clone() if load is None else load.to(self.expert_load)
        if load.shape != (self.num_experts,):
            raise ValueError(f"load must be [E={self.num_experts}], got {tuple(load.shape)}")
        self.gate.e_score_correction_bias += rate * torch.sign(load.mean() - load)
        self.expert_load.zero_()
        return load
