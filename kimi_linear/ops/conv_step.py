"""Causal depthwise short convolution that continues from a cached window (decode and chunked prefill).

The KDA layer runs a depthwise causal conv of width ``W`` (4 in the released model) over each of q, k
and v, then SiLU. Continuing a sequence needs its last ``W - 1`` inputs: the conv of the new tokens
over ``[window, x]`` equals the conv of the whole sequence at those positions, which makes decoding
one token, a prompt fed in pieces, and one long prefill give the same outputs.

| tensor  | shape            | notes                                                          |
|---------|------------------|----------------------------------------------------------------|
| x       | ``[B, T, D]``    | new inputs, channels last (as the projections produce them)    |
| weight  | ``[D, W]`` or ``[D, 1, W]`` | depthwise taps, last tap meets the newest input     |
| window  | ``[B, D, W-1]``  | previous inputs, oldest first; updated **in place**            |
| bias    | ``[D]`` or None  |                                                                |
| return  | ``[B, T, D]``    | dtype of x                                                     |
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_conv1d_with_window(
    x: torch.Tensor,
    weight: torch.Tensor,
    window: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    activation: str | None = "silu",
) -> torch.Tensor:
    """Depthwise causal conv of ``x`` continuing from ``window``; the window then holds the last ``W-1`` inputs."""
    if x.dim() != 3:
        raise ValueError(f"x must be [B, T, D], got shape {tuple(x.shape)}")
    B, T, D = x.shape
    w = weight.reshape(weight.shape[0], weight.shape[-1]) if weight.dim() == 3 else weight
    if w.dim() != 2 or w.shape[0] != D:
        raise ValueError(f"weight must be [D={D}, W] or [D, 1, W], got shape {tuple(weight.shape)}")
    W = w.shape[1]
    if tuple(window.shape) != (B, D, W - 1):
        raise ValueError(f"window must be [B, D, W-1] = {(B, D, W - 1)}, got shape {tuple(window.shape)}")
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"activation must be None or 'silu', got {activation!r}")
    full = torch.cat([window.to(x.dtype), x.transpose(1, 2).to(x.dtype)], dim=-1)  # [B, D, W-1+T]
    if T == 1:
        # One token: a dot product over the W taps; cheaper than a conv launch at decode sizes.
        y = (full.to(w.dtype) * w).sum(dim=-1, keepdim=True)
        if bias is not None:
            y = y + bias.unsqueeze(-1)
    else:
        y = F.conv1d(full.to(w.dtype), w.unsqueeze(1), bias, groups=D)  # [B, D, T]
    if W > 1:
        window.copy_(full[..., -(W - 1):])
    if activation is not None:
        y = F.silu(y)
    return y.transpose(1, 2).to(x.dtype)
