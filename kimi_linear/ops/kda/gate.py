"""The KDA forget gate and the q/k L2 norm, as plain PyTorch (the reference semantics).

``kda_gate_ref`` is the gate of the Kimi Linear layer (docs/kda.md, step 0):

    g = -exp(A_log[h]) * softplus(g_raw[..., h, :] + dt_bias[h, :])        (fp32, <= 0)

The Triton kernels fuse the same computation into the chunked operator (see ``fusion.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Normalise the last dim: ``x / sqrt(sum(x^2) + eps)``, computed in fp32 (fp64 kept), cast back.

    The eps sits inside the square root (as in the released model), so a zero vector maps to zero.
    """
    xf = x.float() if x.dtype != torch.float64 else x
    return (xf * torch.rsqrt((xf * xf).sum(dim=-1, keepdim=True) + eps)).to(x.dtype)


def _gate_params(A_log: torch.Tensor, dt_bias: torch.Tensor, H: int, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    if A_log.numel() != H:
        raise ValueError(f"A_log must hold one value per head (H={H}), as [H] or [1, 1, H, 1]; got shape {tuple(A_log.shape)}")
    if dt_bias.numel() != H * K:
        raise ValueError(f"dt_bias must hold H*K={H * K} values ([H*K] or [H, K]); got shape {tuple(dt_bias.shape)}")
    return A_log.reshape(H, 1), dt_bias.reshape(H, K)


def kda_gate_ref(
    g_raw: torch.Tensor,
    A_log: torch.Tensor,
    dt_bias: torch.Tensor,
    *,
    num_heads: int | None = None,
) -> torch.Tensor:
    """Per-channel log-decay from the raw gate projection.

    | arg     | shape                                   |
    |---------|-----------------------------------------|
    | g_raw   | ``[..., H, K]`` or ``[..., H*K]`` (then pass ``num_heads``) |
    | A_log   | ``[H]`` or ``[1, 1, H, 1]`` (kept fp32)  |
    | dt_bias | ``[H*K]`` or ``[H, K]`` (kept fp32)      |
    | return  | ``[..., H, K]`` float32 (float64 for fp64 input), every value <= 0 |

    softplus switches to the identity above 20 (as torch does), so the result is finite for any
    finite input and tends to ``-inf`` only as ``g_raw`` does.
    """
    if not isinstance(g_raw, torch.Tensor):
        raise TypeError(f"g_raw must be a tensor, got {type(g_raw).__name__}")
    if num_heads is not None:
        if g_raw.shape[-1] % num_heads != 0:
            raise ValueError(f"g_raw's last dim {g_raw.shape[-1]} is not divisible by num_heads={num_heads}")
        g_raw = g_raw.unflatten(-1, (num_heads, g_raw.shape[-1] // num_heads))
    if g_raw.dim() < 2:
        raise ValueError(f"g_raw must be [..., H, K], got shape {tuple(g_raw.shape)}")
    H, K = g_raw.shape[-2], g_raw.shape[-1]
    a, b = _gate_params(A_log, dt_bias, H, K)
    compute = torch.float64 if g_raw.dtype == torch.float64 else torch.float32
    x = g_raw.to(compute) + b.to(compute)
    return -torch.exp(a.to(compute)) * F.softplus(x)
