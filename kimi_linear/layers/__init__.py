"""Layers: nn.Modules holding parameters (names as in the released checkpoint)."""

from kimi_linear.layers.common import RMSNorm
from kimi_linear.layers.kda import KimiDeltaAttention, ShortConvolution
from kimi_linear.layers.mla import MultiHeadLatentAttention
from kimi_linear.layers.moe import Expert, MoEGate, SparseMoeBlock, SwiGLUMLP

__all__ = [
    "RMSNorm",
    "ShortConvolution",
    "KimiDeltaAttention",
    "MultiHeadLatentAttention",
    "SwiGLUMLP",
    "Expert",
    "MoEGate",
    "SparseMoeBlock",
]
