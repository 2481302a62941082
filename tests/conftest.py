"""Shared pytest fixtures. GPU tests carry ``@pytest.mark.gpu`` and are deselected by default."""

from __future__ import annotations

import os
import sys

import pytest
import torch

# Make `import tests.numerics` work however pytest is invoked.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def cuda_device() -> torch.device:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    return torch.device("cuda")


@pytest.fixture
def triton_device() -> str:
    """Where a test can run Triton kernels: "cuda" on a GPU, "cpu" under Triton's interpreter
    (``TRITON_INTERPRET=1``); skips the test where neither is available."""
    pytest.importorskip("triton")
    from kimi_linear.backends import triton_interpret

    if not torch.cuda.is_available() and not triton_interpret():
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


SHARED_FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "fixtures")
