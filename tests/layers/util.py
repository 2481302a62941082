"""Small configurations shared by the layer and model tests."""

from __future__ import annotations

from typing import Any

from kimi_linear.model.config import KimiLinearConfig


def small_config(**overrides: Any) -> KimiLinearConfig:
    """4 layers (KDA, KDA, MLA, KDA), MoE from layer 1, all dims tiny."""
    cfg: dict[str, Any] = dict(
        vocab_size=97, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=4,
        num_attention_heads=2, num_key_value_heads=2, head_dim=16, kv_lora_rank=16, qk_nope_head_dim=8,
        qk_rope_head_dim=4, v_head_dim=8,
        linear_attn_config={"full_attn_layers": [3], "head_dim": 8, "kda_layers": [1, 2, 4], "num_heads": 2,
                            "short_conv_kernel_size": 4},
        num_experts=4, num_experts_per_token=2, num_shared_experts=1, first_k_dense_replace=1,
        routed_scaling_factor=2.446, bos_token_id=1, eos_token_id=2, pad_token_id=0, dtype="float32",
    )
    cfg.update(overrides)
    return KimiLinearConfig(**cfg)
