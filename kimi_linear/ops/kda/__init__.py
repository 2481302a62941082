"""Kimi Delta Attention operators.

References (PyTorch, any device, fp64-capable): ``recurrent_kda_ref``, ``chunk_kda_ref`` and the
baselines in :mod:`kimi_linear.ops.kda.reference`; gate and L2 norm in :mod:`.gate`; fused pre-steps
in :mod:`.fusion`. Triton kernels load lazily from their own modules.
"""

from kimi_linear.ops.kda.fusion import KDAFusion
from kimi_linear.ops.kda.gate import kda_gate_ref, l2norm
from kimi_linear.ops.kda.reference import (
    chunk_decay_ref,
    chunk_gdn_ref,
    chunk_kda_ref,
    recurrent_decay_ref,
    recurrent_gdn_ref,
    recurrent_kda_ref,
)

__all__ = [
    "KDAFusion",
    "kda_gate_ref",
    "l2norm",
    "recurrent_kda_ref",
    "chunk_kda_ref",
    "recurrent_gdn_ref",
    "chunk_gdn_ref",
    "recurrent_decay_ref",
    "chunk_decay_ref",
]
