"""Small pieces every layer uses: the RMSNorm module, fp32-pinned parameters, padding masks, and the
folded block norm's fallbacks (:func:`apply_input_norm`, :func:`add_residual`)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from kimi_linear.ops.norm import rms_norm


class RMSNorm(nn.Module):
    """RMSNorm with a learned scale ``weight [D]`` (see :func:`kimi_linear.ops.norm.rms_norm`;
    ``backend`` picks its inference kernel)."""

    def __init__(self, dim: int, eps: float = 1e-6, backend: str = "auto") -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, backend=self.backend)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class KeepFP32(nn.Module):
    """Mixin: tensors named in ``_keep_fp32`` stay float32 through ``.to(dtype)`` / ``.half()`` / ``.bfloat16()``.

    The gate parameters (``A_log``, ``dt_bias``) and the router's correction bias are tiny but
    precision-critical: a bf16 ``dt_bias`` or a bf16 balancing bias would quantise away the small
    updates training makes. Device moves still apply. The original fp32 values are re-used, so a
    round trip through bf16 does not round them.
    """

    _keep_fp32: tuple[str, ...] = ()

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True):  # type: ignore[override]
        saved = {}
        for name in self._keep_fp32:
            t = self._parameters.get(name, None)
            if t is None:
                t = self._buffers.get(name, None)
            if t is not None and t.dtype == torch.float32:
                saved[name] = t.data
        super()._apply(fn, recurse)
        for name, old in saved.items():
            store = self._parameters if name in self._parameters else self._buffers
            t = store[name]
            if t is not None and t.dtype != torch.float32:
                fixed = old.to(device=t.device, dtype=torch.float32)
                if isinstance(t, nn.Parameter):
                    t.data = fixed
                else:
                    store[name] = fixed
        return self


def bool_mask(attention_mask: torch.Tensor | None, B: int, T: int) -> torch.Tensor | None:
    """Validate a ``[B, T]`` padding mask (1 = real token) and return it as bool (None if absent)."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a [B, T] tensor, got {type(attention_mask).__name__}")
    if tuple(attention_mask.shape) != (B, T):
        raise ValueError(f"attention_mask must be [B, T] = {(B, T)} (1 = real token), got {tuple(attention_mask.shape)}")
    return attention_mask.to(torch.bool)


def apply_input_norm(x: torch.Tensor, input_norm: tuple[torch.Tensor, float] | None, backend: str) -> torch.Tensor:
    """``rms_norm(x, weight, eps)`` for ``input_norm = (weight [D], eps)``, or ``x`` when None.

    The batch-1 decode step hands an attention layer the un-normalised hidden state with the block's
    input norm, which its input projections fold in (docs/decode.md); a path that does not fold it
    normalises here first, with the same values as the block's own norm."""
    if input_norm is None:
        return x
    weight, eps = input_norm
    return rms_norm(x, weight, eps, backend=backend)


def add_residual(out: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    """``residual + out`` (the block's residual add), or ``out`` when None: for the paths whose output
    projection does not add it in its epilogue."""
    return out if residual is None else residual + out
