"""Which compute backends exist on this machine, and how an op picks one.

Ops and layers accept ``backend in {"auto", "triton", "reference"}``. ``"auto"`` takes Triton
for CUDA tensors when Triton imports, and the PyTorch reference everywhere else. Setting
``TRITON_INTERPRET=1`` lets ``"triton"`` run on CPU tensors through Triton's interpreter (tests).
"""

from __future__ import annotations

import functools
import importlib
import os

import torch

BACKENDS = ("auto", "triton", "reference")


@functools.cache
def triton_version() -> str | None:
    """Triton's version string, or None when it does not import (never raises)."""
    try:
        return importlib.import_module("triton").__version__
    except Exception:  # noqa: BLE001 - any import failure means "no Triton"
        return None


def triton_interpret() -> bool:
    """True when Triton kernels run through the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_usable_on(device: torch.device) -> bool:
    """Can a Triton kernel run on tensors of ``device``?"""
    if triton_version() is None:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and triton_interpret()


def resolve_backend(backend: str, device: torch.device) -> str:
    """Turn ``"auto"`` into a concrete backend for ``device``; check a forced one can run.

    Raises:
        ValueError: unknown backend name, or ``"triton"`` forced where Triton cannot run.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_usable_on(device) else "reference"
    if backend == "triton" and not triton_usable_on(device):
        raise ValueError(
            f"backend='triton' needs a CUDA device (or TRITON_INTERPRET=1 on CPU) with Triton installed; "
            f"got device={device}, triton={triton_version()}"
        )
    return backend
