"""Generation tests that force ``backend="triton"`` on CPU use Triton's interpreter, set up exactly as
for the kernel tests (the environment variable must be set before any kernel module is imported)."""

import tests.ops.conftest  # noqa: F401  (side effect: TRITON_INTERPRET=1 without CUDA + interpreter fix)
