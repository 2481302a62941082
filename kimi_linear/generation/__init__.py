"""Inference: the hybrid cache (KDA states + MLA latent cache), sampling, and token generation."""

from kimi_linear.generation.cache import HybridCache, KDACacheSpec, MLACacheSpec, cache_bytes
from kimi_linear.generation.sampling import SamplingConfig, next_token

__all__ = ["HybridCache", "KDACacheSpec", "MLACacheSpec", "cache_bytes", "SamplingConfig", "next_token"]
