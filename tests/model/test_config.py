"""KimiLinearConfig: official config.json round trip, layer mapping, validation, presets."""

from __future__ import annotations

import json
import os

import pytest

from kimi_linear.model.config import KimiLinearConfig, kimi_linear_48b_a3b, list_presets
from tests.conftest import SHARED_FIXTURES
from tests.layers.util import small_config

PACKAGED = os.path.join(os.path.dirname(__file__), "..", "..", "kimi_linear", "model", "presets",
                        "kimi_linear_48b_a3b.json")


def official() -> dict:
    path = os.path.join(SHARED_FIXTURES, "kimi_linear_48b_a3b_config.json")
    return json.load(open(path if os.path.exists(path) else PACKAGED))


def test_official_round_trip_keeps_every_key(tmp_path):
    d = official()
    cfg = KimiLinearConfig.from_dict(d)
    assert cfg.to_dict() == d
    cfg.save_pretrained(tmp_path)
    assert json.load(open(tmp_path / "config.json")) == d
    assert KimiLinearConfig.from_pretrained(tmp_path) == cfg
    assert kimi_linear_48b_a3b() == cfg


def test_one_based_layer_mapping():
    cfg = kimi_linear_48b_a3b()
    types = cfg.layer_types()
    assert [i for i, t in enumerate(types) if t == "mla"] == [3, 7, 11, 15, 19, 23, 26]
    assert not cfg.is_moe_layer(0) and all(cfg.is_moe_layer(i) for i in range(1, 27))


def test_unknown_keys_kept_and_hf_derived_keys_refreshed():
    d = small_config().to_dict()
    d.update(attention_bias=False, some_future_key={"a": 1}, layer_types=["stale"])
    cfg = KimiLinearConfig.from_dict(d)
    out = cfg.to_dict()
    assert out["some_future_key"] == {"a": 1} and out["attention_bias"] is False
    assert out["layer_types"] == ["linear_attention", "linear_attention", "full_attention", "linear_attention"]


def test_variant_written_only_when_not_default():
    assert "kda_variant" not in small_config().to_dict()
    d = small_config(kda_variant="gdn").to_dict()
    assert d["kda_variant"] == "gdn" and KimiLinearConfig.from_dict(d).kda_variant == "gdn"


@pytest.mark.parametrize("change,needle", [
    (dict(linear_attn_config={"kda_layers": [1, 2], "full_attn_layers": [2, 3], "num_heads": 2, "head_dim": 8}),
     "in both"),
    (dict(linear_attn_config={"kda_layers": [1, 2], "full_attn_layers": [5], "num_heads": 2, "head_dim": 8}),
     "out-of-range [5]"),
    (dict(num_experts_per_token=9), "num_experts_per_token must be in [1, num_experts=4], got 9"),
    (dict(hidden_act="gelu"), "hidden_act must be 'silu', got 'gelu'"),
    (dict(kda_variant="mamba"), "kda_variant must be one of"),
    (dict(mla_use_nope=False), "mla_use_nope"),
    (dict(hidden_size=0), "hidden_size must be a positive int, got 0"),
])
def test_validation_names_bad_values(change, needle):
    with pytest.raises(ValueError) as exc:
        small_config(**change)
    assert needle in str(exc.value)


def test_presets_build_and_have_expected_layouts():
    names = list_presets()
    assert {"tiny", "tiny-moe", "20m-kda", "100m-mla-moe", "500m-gdn", "kimi_linear_48b_a3b"} <= set(names)
    for name in names:
        KimiLinearConfig.preset(name)  # validates
    assert KimiLinearConfig.preset("20m").layer_types() == ["kda"] * 3 + ["mla"] + ["kda"] * 3 + ["mla"]
    assert set(KimiLinearConfig.preset("20m-kda").layer_types()) == {"kda"}
    assert set(KimiLinearConfig.preset("20m-mla").layer_types()) == {"mla"}
    assert KimiLinearConfig.preset("20m-gdn").kda_variant == "gdn"
    assert KimiLinearConfig.preset("tiny-moe").num_experts and not KimiLinearConfig.preset("tiny").num_experts
    assert KimiLinearConfig.preset("tiny", vocab_size=256).vocab_size == 256
    with pytest.raises(ValueError, match="unknown preset"):
        KimiLinearConfig.preset("7b")
