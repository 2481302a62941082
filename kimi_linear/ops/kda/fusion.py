"""Work a KDA layer does before the operator that a kernel may do inside it instead.

The Kimi Linear layer L2-normalises q and k, turns a raw projection into the gate with
``A_log`` and ``dt_bias``, and squashes beta logits with a sigmoid. Passing
``fusion=KDAFusion(...)`` to any KDA operator means "my q, k, g, beta are the raw forms; apply
these steps first". References apply them with :func:`apply_fusion_ref`; kernels fuse them and
return gradients for the raw inputs and for ``A_log`` / ``dt_bias``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kimi_linear.ops.kda.gate import kda_gate_ref, l2norm


@dataclass(frozen=True, eq=False)
class KDAFusion:
    """Pre-operator steps to fuse. All off by default (q, k, g, beta taken as they are).

    Attributes:
        qk_l2norm: q and k are raw; each head vector is L2-normalised (eps 1e-6) first.
        beta_sigmoid: beta holds logits; ``sigmoid(beta)`` is used.
        A_log: ``[H]`` or ``[1, 1, H, 1]`` fp32. When set (with ``dt_bias``), g holds the raw gate
            projection ``[B, T, HV, K]`` and the log-decay is ``-exp(A_log) * softplus(g + dt_bias)``.
        dt_bias: ``[HV*K]`` fp32, the softplus bias of the gate.
    """

    qk_l2norm: bool = False
    beta_sigmoid: bool = False
    A_log: torch.Tensor | None = None
    dt_bias: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if (self.A_log is None) != (self.dt_bias is None):
            raise ValueError("KDAFusion needs both A_log and dt_bias (or neither) for the in-kernel gate")

    @property
    def gate_from_raw(self) -> bool:
        return self.A_log is not None


def apply_fusion_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    fusion: KDAFusion | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Apply ``fusion``'s steps in plain PyTorch (differentiable). Returns ``q, k, g, beta``."""
    if fusion is None:
        return q, k, g, beta
    if fusion.qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    if fusion.gate_from_raw:
        g = kda_gate_ref(g, fusion.A_log, fusion.dt_bias)
    if fusion.beta_sigmoid:
        beta = torch.sigmoid(beta.float() if beta.dtype != torch.float64 else beta)
    return q, k, g, beta
