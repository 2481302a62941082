"""Causal depthwise short convolution (the KDA layer's q/k/v mixing over the last few tokens).

``y[t, d] = act( sum_{j=0}^{W-1} weight[d, W-1-j] * x[t-j, d] )`` with ``x[t-j] = 0`` (or the carried
window) before a sequence's first token. The window of the last ``W-1`` inputs is the only state a
decoder has to carry between calls.

| tensor        | shape                     | notes                                        |
|---------------|---------------------------|----------------------------------------------|
| x             | ``[B, T, D]``             | channels last (as the projections give them) |
| weight        | ``[D, 1, W]`` or ``[D, W]`` | one filter per channel (the checkpoint stores ``[D, 1, W]``) |
| bias          | ``[D]`` or None           | the released model has none                  |
| window        | ``[N, D, W-1]``           | the last W-1 inputs, oldest first; N = B, or sequences in a varlen pack |
| y             | ``[B, T, D]``             | dtype of x                                   |

With ``cu_seqlens`` (int ``[N+1]``, B == 1) the T axis packs N sequences and no token ever sees an
input of another sequence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kimi_linear.backends import resolve_backend

__all__ = ["causal_conv1d", "causal_conv1d_update", "causal_conv1d_update_"]

_ACTIVATIONS = (None, "silu", "swish")
# The whole-sequence Triton kernel where it applies (see causal_conv1d); False for A/B benchmark runs.
SEQUENCE_KERNEL = True


def _check(x: torch.Tensor, weight: torch.Tensor, activation: str | None) -> tuple[torch.Tensor, int]:
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError("x and weight must be tensors")
    if weight.dim() == 3:
        if weight.shape[1] != 1:
            raise ValueError(f"weight must be [D, 1, W] (depthwise) or [D, W], got {tuple(weight.shape)}")
        weight = weight[:, 0]
    if weight.dim() != 2:
        raise ValueError(f"weight must be [D, 1, W] or [D, W], got {tuple(weight.shape)}")
    if x.shape[-1] != weight.shape[0]:
        raise ValueError(f"x's channel dim {x.shape[-1]} must equal weight's D={weight.shape[0]}")
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {activation!r}")
    return weight, weight.shape[1]


def _step_input(x: torch.Tensor, window: torch.Tensor, W: int) -> tuple[torch.Tensor, bool]:
    """A decode step's ``x`` as ``[B, D]`` (and whether it came 2-D), after checking x and window."""
    if not (x.dim() == 2 or (x.dim() == 3 and x.shape[1] == 1)):
        raise ValueError(f"x must be [B, D] or [B, 1, D], got shape {tuple(x.shape)}")
    x2 = x if x.dim() == 2 else x[:, 0]
    B, D = x2.shape
    if tuple(window.shape) != (B, D, W - 1):
        raise ValueError(f"window must be [B, D, W-1] = {(B, D, W - 1)}, got {tuple(window.shape)}")
    return x2, x.dim() == 2


def _act(y: torch.Tensor, activation: str | None) -> torch.Tensor:
    return F.silu(y) if activation in ("silu", "swish") else y


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    activation: str | None = "silu",
    initial_window: torch.Tensor | None = None,
    output_final_window: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Full-sequence causal depthwise conv. Returns ``(y [B, T, D], final_window [N, D, W-1] | None)``.

    ``initial_window`` holds each sequence's previous ``W-1`` inputs (zeros when None), so chunked
    prefill continues exactly where the last call stopped. ``backend`` "auto" takes the Triton kernel
    (one launch, fp32 sums rounded once) on CUDA where no gradient is needed (prefill, evaluation);
    packed sequences (``cu_seqlens``) and training take the PyTorch form.
    """
    weight, W = _check(x, weight, activation)
    if x.dim() != 3:
        raise ValueError(f"x must be [B, T, D], got shape {tuple(x.shape)}")
    B, T, D = x.shape
    if cu_seqlens is not None:
        return _varlen(x, weight, bias, activation, initial_window, output_final_window, cu_seqlens)
    if initial_window is not None and tuple(initial_window.shape) != (B, D, W - 1):
        raise ValueError(f"initial_window must be [B, D, W-1] = {(B, D, W - 1)}, got {tuple(initial_window.shape)}")
    for name, t in (("initial_window", initial_window), ("weight", weight), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} must be on x's device {x.device}, got {t.device}")
    if bias is not None and tuple(bias.shape) != (D,):
        raise ValueError(f"bias must be [D] = ({D},), got {tuple(bias.shape)}")
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                                 for t in (x, weight, bias, initial_window))
    if SEQUENCE_KERNEL and W >= 2 and not needs_grad and resolve_backend(backend, x.device) == "triton":
        from kimi_linear.ops.conv_kernel import conv_seq_triton

        return conv_seq_triton(x, weight, bias, activation in ("silu", "swish"), initial_window, output_final_window)
    xt = x.transpose(1, 2).to(weight.dtype)  # [B, D, T]
    if initial_window is None:
        xt = F.pad(xt, (W - 1, 0))
    else:
        xt = torch.cat([initial_window.to(weight.dtype), xt], dim=-1)
    if T == 0:  # nothing to convolve; the window passes through unchanged
        y = x.new_zeros(B, 0, D)
    else:
        y = F.conv1d(xt, weight.unsqueeze(1), bias, groups=D)  # [B, D, T]
        y = _act(y, activation).transpose(1, 2).to(x.dtype)
    final = xt[..., xt.shape[-1] - (W - 1):].to(x.dtype) if output_final_window else None
    return y, final


def _varlen(x, weight, bias, activation, initial_window, output_final_window, cu_seqlens):
    """Packed sequences: shifted sums whose taps are masked at each sequence's start (or read from its window)."""
    B, T, D = x.shape
    W = weight.shape[1]
    if B != 1:
        raise ValueError(f"with cu_seqlens the batch must be 1 (sequences packed along T), got B={B}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be a 1-D int tensor [N+1], got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}")
    offsets = cu_seqlens.to(device=x.device, dtype=torch.long)
    if offsets[0].item() != 0 or offsets[-1].item() != T:
        raise ValueError(f"cu_seqlens must start at 0 and end at T={T}, got {cu_seqlens.tolist()}")
    N = offsets.numel() - 1
    if initial_window is not None and tuple(initial_window.shape) != (N, D, W - 1):
        raise ValueError(f"initial_window must be [N, D, W-1] = {(N, D, W - 1)}, got {tuple(initial_window.shape)}")
    lengths = offsets[1:] - offsets[:-1]
    seq_id = torch.repeat_interleave(torch.arange(N, device=x.device), lengths, output_size=T)  # [T]
    pos = torch.arange(T, device=x.device) - offsets[seq_id]  # position inside its sequence
    xs = x[0].to(weight.dtype)  # [T, D]
    y = torch.zeros_like(xs)
    for j in range(W):  # tap j reads the input j steps back
        inside = pos >= j
        shifted = torch.zeros_like(xs)
        if T > j:
            shifted[j:] = xs[: T - j]
        shifted = torch.where(inside[:, None], shifted, torch.zeros_like(shifted))
        if initial_window is not None and j > 0:
            # before the start: input at position pos - j lives in the window at index W-1 + pos - j
            widx = (W - 1 + pos - j).clamp(min=0, max=W - 2)  # only read where pos < j
            from_window = initial_window.to(weight.dtype)[seq_id, :, widx]  # [T, D]
            shifted = torch.where(inside[:, None], shifted, from_window)
        y = y + shifted * weight[:, W - 1 - j]
    if bias is not None:
        y = y + bias
    y = _act(y, activation).to(x.dtype).unsqueeze(0)
    final = None
    if output_final_window:
        # the last W-1 inputs of each sequence, taking from its initial window when it is short
        idx = offsets[1:, None] - (W - 1) + torch.arange(W - 1, device=x.device)[None, :]  # [N, W-1]
        from_x = idx >= offsets[:-1, None]
        gathered = xs[idx.clamp(min=0, max=max(T - 1, 0))] if T > 0 else xs.new_zeros(N, W - 1, D)  # [N, W-1, D]
        if initial_window is not None:
            widx = (W - 1 + idx - offsets[:-1, None]).clamp(min=0, max=W - 2)  # index into the window
            prev = torch.gather(initial_window.to(weight.dtype), 2, widx[:, None, :].expand(N, D, W - 1))
            prev = prev.transpose(1, 2)
        else:
            prev = torch.zeros_like(gathered)
        final = torch.where(from_x[..., None], gathered, prev).transpose(1, 2).to(x.dtype).contiguous()
    return y, final


def causal_conv1d_update(
    x: torch.Tensor,
    window: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    activation: str | None = "silu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step. ``x [B, D]`` (or ``[B, 1, D]``), ``window [B, D, W-1]``.

    Returns ``(y, new_window)``: y shaped like x, new_window ``[B, D, W-1]`` (the window shifted by one
    with x appended; the input window is not modified).
    """
    weight, W = _check(x, weight, activation)
    x2, squeeze = _step_input(x, window, W)
    full = torch.cat([window.to(weight.dtype), x2.to(weight.dtype)[:, :, None]], dim=-1)  # [B, D, W]
    y = (full * weight).sum(-1)
    if bias is not None:
        y = y + bias
    y = _act(y, activation).to(x.dtype)
    new_window = full[..., 1:].to(window.dtype)
    return (y if squeeze else y.unsqueeze(1)), new_window


def causal_conv1d_update_(
    x: torch.Tensor,
    window: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    activation: str | None = "silu",
    backend: str = "auto",
) -> torch.Tensor:
    """One decode step that updates ``window [B, D, W-1]`` in place; returns y shaped like ``x``
    (``[B, D]`` or ``[B, 1, D]``). Same arithmetic as :func:`causal_conv1d_update` (the Triton path
    sums in fp32 and rounds once, so half-precision results may differ from it by one rounding).
    ``backend`` picks the Triton kernel (one launch, CUDA default) or the PyTorch step + copy."""
    weight2, W = _check(x, weight, activation)
    x2, squeeze = _step_input(x, window, W)
    for name, t in (("window", window), ("weight", weight), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} must be on x's device {x.device}, got {t.device}")
    if W < 2 or resolve_backend(backend, x.device) == "reference" or not window.is_contiguous():
        y, new_window = causal_conv1d_update(x2, window, weight, bias, activation=activation)
        window.copy_(new_window)
    else:
        from kimi_linear.ops.conv_kernel import conv_update_triton

        y = conv_update_triton(x2, window, weight2, bias, silu=activation in ("silu", "swish"))
    return y if squeeze else y.unsqueeze(1)
