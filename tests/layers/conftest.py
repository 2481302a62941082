"""Layer tests force the Triton backend on CPU through the interpreter (tiny sizes), so the interpreter
switch must be set before anything imports Triton (transformers does, when the parity tests load):
reuse the ops tests' setup, which sets ``TRITON_INTERPRET=1`` on machines without CUDA."""

from tests.ops import conftest as _ops_conftest  # noqa: F401
