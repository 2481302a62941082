"""Kernel tests on a machine without a GPU run Triton through its CPU interpreter.

``TRITON_INTERPRET`` is read when a ``@triton.jit`` function is defined, so it must be set before
any kernel module is imported; kernel modules are imported lazily by the ops, i.e. after this file
runs. On a CUDA machine nothing is changed (the kernels compile for the GPU). Setting the variable
does not change ``backend="auto"`` on CPU tensors (it still picks the reference); only tests that
force ``backend="triton"`` use the interpreter.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    # Triton 3.6's interpreter turns a scalar tensor into a Python int with ``int(ndarray)`` on a
    # 1-element array, which NumPy >= 2.4 refuses ("only 0-dimensional arrays ..."); loops such as
    # ``for t in range(0, T)`` then fail in the interpreter although they compile fine for the GPU.
    # Patch that one conversion (the interpreter restores its patches after each launch anyway).
    try:
        import triton.runtime.interpreter as _interp
    except ImportError:  # no Triton: kernel tests skip themselves
        _interp = None
    if _interp is not None and hasattr(_interp, "_patch_lang_tensor"):
        _original_patch = _interp._patch_lang_tensor

        def _patch_lang_tensor(tensor, scope):  # type: ignore[no-untyped-def]
            _original_patch(tensor, scope)
            scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

        _interp._patch_lang_tensor = _patch_lang_tensor


@pytest.fixture
def poisoned_alloc(monkeypatch):
    """Every torch.empty / empty_like inside the op returns NaN: an element the kernel forgets to write fails."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def empty(*a, **kw):
        t = real_empty(*a, **kw)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    def empty_like(*a, **kw):
        t = real_empty_like(*a, **kw)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(torch, "empty_like", empty_like)
