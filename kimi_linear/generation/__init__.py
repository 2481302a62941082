"""Inference: the hybrid cache (KDA states + MLA latent cache), sampling, and token generation."""

from kimi_linear.generation.cache import (
    HybridCache,
    KDACacheSpec,
    MLACacheSpec,
    cache_bytes,
    cache_for_config,
)
from kimi_linear.generation.generate import GenerationOutput, StepEvent, generate, stream_generate
from kimi_linear.generation.sampling import SamplingConfig, next_token

__all__ = [
    "HybridCache",
    "KDACacheSpec",
    "MLACacheSpec",
    "cache_bytes",
    "cache_for_config",
    "GenerationOutput",
    "StepEvent",
    "generate",
    "stream_generate",
    "SamplingConfig",
    "next_token",
]
