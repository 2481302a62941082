"""The Kimi Linear model: config (official config.json + presets), modules, checkpoints."""

from kimi_linear.model.config import KimiLinearConfig, kimi_linear_48b_a3b, list_presets, small_preset
from kimi_linear.model.modeling import (
    CausalLMOutput,
    KimiLinearDecoderLayer,
    KimiLinearForCausalLM,
    KimiLinearModel,
)

__all__ = [
    "KimiLinearConfig",
    "kimi_linear_48b_a3b",
    "small_preset",
    "list_presets",
    "CausalLMOutput",
    "KimiLinearDecoderLayer",
    "KimiLinearModel",
    "KimiLinearForCausalLM",
]
