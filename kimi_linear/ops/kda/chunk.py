"""``chunk_kda``: the public chunked KDA entry (training and prefill).

Dispatches to the Triton kernels on CUDA (``backend="auto"``) and to :func:`chunk_kda_ref`
elsewhere; ``backend`` forces a choice. Same contract as :func:`chunk_kda_ref` (docs/kda.md).
"""

from __future__ import annotations

import torch

from kimi_linear.backends import resolve_backend
from kimi_linear.ops.kda.fusion import KDAFusion
from kimi_linear.ops.kda.reference import chunk_kda_ref


def chunk_kda(
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
    """Chunked KDA. Shapes as :func:`kimi_linear.ops.kda.reference.chunk_kda_ref`."""
    chosen = resolve_backend(backend, q.device)
    if chosen == "reference":
        return chunk_kda_ref(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                             output_final_state=output_final_state, cu_seqlens=cu_seqlens, fusion=fusion)
    raise NotImplementedError("the Triton chunk_kda kernels are being written (issue 3)")
