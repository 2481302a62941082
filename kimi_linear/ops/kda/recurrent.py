"""``recurrent_kda``: token-by-token KDA for decoding and short inputs.

Dispatches to a fused Triton kernel on CUDA and to :func:`recurrent_kda_ref` elsewhere.
"""

from __future__ import annotations

import torch

from kimi_linear.backends import resolve_backend
from kimi_linear.ops.kda.fusion import KDAFusion
from kimi_linear.ops.kda.reference import recurrent_kda_ref


def recurrent_kda(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    fusion: KDAFusion | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Recurrent KDA. Shapes as :func:`kimi_linear.ops.kda.reference.recurrent_kda_ref`."""
    chosen = resolve_backend(backend, q.device)
    if chosen == "reference":
        return recurrent_kda_ref(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                                 output_final_state=output_final_state, cu_seqlens=cu_seqlens, fusion=fusion)
    raise NotImplementedError("the Triton recurrent_kda kernel is being written (issue 3)")
