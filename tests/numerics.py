"""One tolerance table and the error measure every numerical test uses.

Error measure: relative RMS error ``||out - ref||_2 / ||ref||_2`` against a reference computed in
float64 (or fp32 where stated), after checking that ``out`` holds no NaN/Inf. The tolerances are
set by what the arithmetic can do (docs/numerics.md), not tuned to pass.
"""

from __future__ import annotations

import torch

# Keyed by (what is compared, dtype of the kernel's inputs).
TOLERANCES: dict[tuple[str, torch.dtype], float] = {
    # reference vs reference in fp64: only rounding
    ("ref", torch.float64): 1e-10,
    # kernel outputs / states / gradients against an fp64 reference
    ("kernel_fwd", torch.float32): 2e-3,  # Triton's fp32 dot is tf32 on GPU
    ("kernel_fwd", torch.float16): 6e-3,
    ("kernel_fwd", torch.bfloat16): 1.6e-2,
    ("kernel_bwd", torch.float32): 5e-3,
    ("kernel_bwd", torch.float16): 1.5e-2,
    ("kernel_bwd", torch.bfloat16): 3e-2,
    # the same fp32 kernels under Triton's CPU interpreter: its dots are true fp32 (no tf32), measured
    # errors are <= ~2e-5 (outputs ~1e-6); not for sums with heavy cancellation such as dA_log
    ("kernel_interp", torch.float32): 1e-4,
    # whole layers / models: triton backend vs reference backend with shared weights
    ("layer", torch.float32): 5e-3,
    ("layer", torch.bfloat16): 3e-2,
    # model parity with transformers in fp32 (same math, different op order)
    ("parity", torch.float32): 1e-4,
    # cached prefill + decode vs the full forward, fp32, same weights (chunk vs recurrent KDA,
    # absorbed vs expanded MLA: the same math in another order)
    ("decode", torch.float32): 1e-5,
}


def tolerance(kind: str, dtype: torch.dtype) -> float:
    try:
        return TOLERANCES[(kind, dtype)]
    except KeyError as exc:
        raise KeyError(f"no tolerance for ({kind!r}, {dtype}); add it to tests/numerics.py") from exc


def rel_rms(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64; +inf if ``out`` has NaN/Inf (never passes)."""
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    if out64.shape != ref64.shape:
        raise AssertionError(f"shape mismatch: out {tuple(out64.shape)} vs ref {tuple(ref64.shape)}")
    if not torch.isfinite(out64).all():
        return float("inf")
    denom = ref64.norm().item()
    num = (out64 - ref64).norm().item()
    if denom == 0.0:
        return num
    return num / denom


def assert_close(out: torch.Tensor, ref: torch.Tensor, kind: str, dtype: torch.dtype, what: str = "") -> None:
    """Assert ``rel_rms(out, ref) <= tolerance(kind, dtype)`` with a message naming the error."""
    err = rel_rms(out, ref)
    tol = tolerance(kind, dtype)
    assert err <= tol, f"{what}: relative RMS error {err:.3e} > tolerance {tol:.1e} ({kind}, {dtype})"


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill an output buffer with NaN so an element a kernel forgets to write cannot pass."""
    return t.fill_(float("nan"))
