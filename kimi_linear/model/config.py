"""``KimiLinearConfig``: the official ``config.json`` as a validated dataclass, plus presets.

Field names are the keys of the released config (``../presets/kimi_linear_48b_a3b.json``), so a
config read from disk and written back keeps every key and value. Keys this class does not know
(for instance those transformers adds: ``layer_types``, ``attention_bias``, ...) live in ``extra``
and are written back too. ``linear_attn_config.kda_layers`` / ``full_attn_layers`` are 1-based, as
on disk; :meth:`layer_types` gives the 0-based per-layer view the model uses.

``kda_variant`` (not an official key; written only when it is not ``"kda"``) swaps the linear
attention for a baseline: ``"gdn"`` (Gated DeltaNet: one decay per head) or ``"decay"``
(per-channel decay, no delta rule).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

KDA_VARIANTS = ("kda", "gdn", "decay")
_PRESET_SIZES = ("tiny", "20m", "100m", "500m")
_PRESET_LAYOUTS = ("hybrid", "kda", "mla", "gdn")
# Keys transformers derives from the official ones; refreshed on save so they never go stale.
_HF_DERIVED = ("layer_types", "mlp_layer_types", "linear_head_dim", "linear_num_heads", "linear_conv_kernel_dim",
               "qk_head_dim")


@dataclass
class KimiLinearConfig:
    """Hyper-parameters of the Kimi Linear model (defaults: the released 48B-A3B model)."""

    vocab_size: int = 163840
    hidden_size: int = 2304
    intermediate_size: int = 9216
    moe_intermediate_size: int = 1024
    num_hidden_layers: int = 27
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int = 72
    kv_lora_rank: int = 512
    q_lora_rank: int | None = None
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    mla_use_nope: bool = True
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    linear_attn_config: dict[str, Any] | None = field(default_factory=lambda: {
        "full_attn_layers": [4, 8, 12, 16, 20, 24, 27],
        "head_dim": 128,
        "kda_layers": [1, 2, 3, 5, 6, 7, 9, 10, 11, 13, 14, 15, 17, 18, 19, 21, 22, 23, 25, 26],
        "num_heads": 32,
        "short_conv_kernel_size": 4,
    })
    num_experts: int | None = 256
    num_experts_per_token: int = 8
    num_shared_experts: int = 1
    moe_layer_freq: int = 1
    first_k_dense_replace: int = 1
    moe_renormalize: bool = True
    moe_router_activation_func: str = "sigmoid"
    routed_scaling_factor: float = 2.446
    num_expert_group: int = 1
    topk_group: int = 1
    use_grouped_topk: bool = True
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 163584
    eos_token_id: int | list[int] | None = 163586
    pad_token_id: int | None = 163839
    model_max_length: int = 1048576
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    use_cache: bool = True
    num_nextn_predict_layers: int = 0
    dtype: str | None = "bfloat16"
    model_type: str = "kimi_linear"
    architectures: list[str] = field(default_factory=lambda: ["KimiLinearForCausalLM"])
    auto_map: dict[str, str] | None = None
    transformers_version: str | None = None
    # --- not official keys ---
    kda_variant: str = "kda"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ derived views
    @property
    def kda_num_heads(self) -> int:
        return int(self.linear_attn_config["num_heads"]) if self.linear_attn_config else 0

    @property
    def kda_head_dim(self) -> int:
        return int(self.linear_attn_config["head_dim"]) if self.linear_attn_config else 0

    @property
    def conv_kernel_size(self) -> int:
        return int(self.linear_attn_config.get("short_conv_kernel_size", 4)) if self.linear_attn_config else 4

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def layer_types(self) -> list[str]:
        """``"kda"`` or ``"mla"`` for each layer, 0-based."""
        kda = set(self.linear_attn_config.get("kda_layers", [])) if self.linear_attn_config else set()
        return ["kda" if (i + 1) in kda else "mla" for i in range(self.num_hidden_layers)]

    def is_moe_layer(self, layer_idx: int) -> bool:
        """MoE or dense MLP at 0-based ``layer_idx`` (the released model's rule)."""
        return bool(self.num_experts) and layer_idx >= self.first_k_dense_replace and layer_idx % self.moe_layer_freq == 0

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ``ValueError`` naming every value that breaks the model's assumptions."""
        errors: list[str] = []

        def positive(name: str) -> None:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                errors.append(f"{name} must be a positive int, got {v!r}")

        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "kv_lora_rank", "v_head_dim"):
            positive(name)
        for name in ("qk_nope_head_dim", "qk_rope_head_dim", "first_k_dense_replace"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                errors.append(f"{name} must be a non-negative int, got {getattr(self, name)!r}")
        if self.qk_nope_head_dim + self.qk_rope_head_dim < 1:
            errors.append("qk_nope_head_dim + qk_rope_head_dim must be >= 1")
        if self.q_lora_rank is not None:
            errors.append(f"q_lora_rank must be None (the released model has no query low rank), got {self.q_lora_rank!r}")
        if self.mla_use_nope is not True:
            errors.append(f"mla_use_nope must be true (MLA without position encoding), got {self.mla_use_nope!r}")
        if self.hidden_act != "silu":
            errors.append(f"hidden_act must be 'silu', got {self.hidden_act!r}")
        if self.moe_router_activation_func != "sigmoid":
            errors.append(f"moe_router_activation_func must be 'sigmoid', got {self.moe_router_activation_func!r}")
        if self.kda_variant not in KDA_VARIANTS:
            errors.append(f"kda_variant must be one of {KDA_VARIANTS}, got {self.kda_variant!r}")
        if not (isinstance(self.rms_norm_eps, (int, float)) and self.rms_norm_eps > 0):
            errors.append(f"rms_norm_eps must be > 0, got {self.rms_norm_eps!r}")
        L = self.num_hidden_layers if isinstance(self.num_hidden_layers, int) else 0
        lac = self.linear_attn_config
        if lac is not None:
            missing = [k for k in ("kda_layers", "full_attn_layers", "num_heads", "head_dim") if k not in lac]
            if missing:
                errors.append(f"linear_attn_config is missing {missing}")
            else:
                kda, full = list(lac["kda_layers"]), list(lac["full_attn_layers"])
                both = sorted(set(kda) & set(full))
                if both:
                    errors.append(f"layers {both} are in both kda_layers and full_attn_layers")
                bad = sorted(i for i in kda + full if not isinstance(i, int) or not 1 <= i <= L)
                if bad:
                    errors.append(f"kda_layers/full_attn_layers are 1-based in [1, {L}]; got out-of-range {bad}")
                uncovered = sorted(set(range(1, L + 1)) - set(kda) - set(full))
                if uncovered:
                    errors.append(f"layers {uncovered} are in neither kda_layers nor full_attn_layers")
                for key in ("num_heads", "head_dim"):
                    if not isinstance(lac[key], int) or lac[key] < 1:
                        errors.append(f"linear_attn_config.{key} must be a positive int, got {lac[key]!r}")
                ks = lac.get("short_conv_kernel_size", 4)
                if not isinstance(ks, int) or ks < 1:
                    errors.append(f"linear_attn_config.short_conv_kernel_size must be a positive int, got {ks!r}")
        if self.num_experts:
            if not 1 <= self.num_experts_per_token <= self.num_experts:
                errors.append(f"num_experts_per_token must be in [1, num_experts={self.num_experts}], "
                              f"got {self.num_experts_per_token}")
            if self.num_expert_group < 1 or self.num_experts % self.num_expert_group:
                errors.append(f"num_experts={self.num_experts} must be divisible by num_expert_group={self.num_expert_group}")
            if not 1 <= self.topk_group <= max(self.num_expert_group, 1):
                errors.append(f"topk_group must be in [1, num_expert_group={self.num_expert_group}], got {self.topk_group}")
            if self.moe_layer_freq < 1:
                errors.append(f"moe_layer_freq must be >= 1, got {self.moe_layer_freq}")
            positive("moe_intermediate_size")
            if self.num_shared_experts < 0:
                errors.append(f"num_shared_experts must be >= 0, got {self.num_shared_experts}")
        if errors:
            raise ValueError("invalid KimiLinearConfig: " + "; ".join(errors))

    # ------------------------------------------------------------------ (de)serialisation
    @classmethod
    def from_dict(cls, d: dict[str, Any], **overrides: Any) -> KimiLinearConfig:
        """Build from a ``config.json`` dict; unknown keys go to ``extra`` (kept on save)."""
        d = {**copy.deepcopy(d), **overrides}
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names}
        extra = dict(d.get("extra", {}))
        extra.update({k: v for k, v in d.items() if k not in names and k != "extra"})
        # transformers writes the whole eos list or a single int; both are kept as given.
        return cls(**known, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        """The ``config.json`` dict: every official key, ``extra`` keys, ``kda_variant`` only if not "kda"."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            v = copy.deepcopy(getattr(self, f.name))
            if f.name == "kda_variant" and v == "kda":
                continue
            if f.name in ("auto_map", "transformers_version") and v is None:
                continue
            out[f.name] = v
        extra = copy.deepcopy(self.extra)
        derived = self._hf_derived()
        for k in _HF_DERIVED:
            if k in extra:
                extra[k] = derived[k]
        out.update(extra)
        return dict(sorted(out.items()))

    def _hf_derived(self) -> dict[str, Any]:
        return {
            "layer_types": ["linear_attention" if t == "kda" else "full_attention" for t in self.layer_types()],
            "mlp_layer_types": ["sparse" if self.is_moe_layer(i) else "dense" for i in range(self.num_hidden_layers)],
            "linear_head_dim": self.kda_head_dim,
            "linear_num_heads": self.kda_num_heads,
            "linear_conv_kernel_dim": self.conv_kernel_size,
            "qk_head_dim": self.qk_head_dim,
        }

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_json_file(cls, path: str | os.PathLike, **overrides: Any) -> KimiLinearConfig:
        with open(path, encoding="utf-8") as fh:
            return cls.from_dict(json.load(fh), **overrides)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, **overrides: Any) -> KimiLinearConfig:
        """Read ``directory/config.json``."""
        return cls.from_json_file(os.path.join(directory, "config.json"), **overrides)

    def save_pretrained(self, directory: str | os.PathLike) -> str:
        """Write ``directory/config.json`` atomically; returns its path."""
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, "config.json")
        tmp = path + f".tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(self.to_json_string())
        os.replace(tmp, path)
        return path

    def replace(self, **changes: Any) -> KimiLinearConfig:
        """A validated copy with some fields changed."""
        return dataclasses.replace(copy.deepcopy(self), **changes)

    # ------------------------------------------------------------------ presets
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> KimiLinearConfig:
        """A named configuration (see :func:`list_presets`), with field overrides."""
        if name in ("kimi_linear_48b_a3b", "48b-a3b", "kimi-linear-48b-a3b"):
            return kimi_linear_48b_a3b(**overrides)
        parts = name.split("-")
        size, rest = parts[0], parts[1:]
        moe = bool(rest) and rest[-1] == "moe"
        if moe:
            rest = rest[:-1]
        layout = rest[0] if rest else "hybrid"
        if size not in _PRESET_SIZES or layout not in _PRESET_LAYOUTS or len(rest) > 1:
            raise ValueError(f"unknown preset {name!r}; known: {list_presets()}")
        return small_preset(size, layout, moe, **overrides)


def kimi_linear_48b_a3b(**overrides: Any) -> KimiLinearConfig:
    """The released Kimi-Linear-48B-A3B configuration (its ``config.json``, shipped in the package)."""
    text = resources.files("kimi_linear.model").joinpath("presets/kimi_linear_48b_a3b.json").read_text("utf-8")
    return KimiLinearConfig.from_dict(json.loads(text), **overrides)


# size -> (hidden, layers, kda heads x head dim, mla heads, nope/rope/v dims, kv_lora, intermediate)
_SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(hidden=128, layers=4, heads=2, head_dim=64, mla_heads=2, nope=32, rope=16, v=32, kv_lora=64, inter=384),
    "20m": dict(hidden=256, layers=8, heads=4, head_dim=64, mla_heads=4, nope=64, rope=32, v=64, kv_lora=128, inter=768),
    "100m": dict(hidden=640, layers=12, heads=5, head_dim=128, mla_heads=5, nope=128, rope=64, v=128, kv_lora=256,
                 inter=1792),
    "500m": dict(hidden=1280, layers=20, heads=10, head_dim=128, mla_heads=10, nope=128, rope=64, v=128, kv_lora=512,
                 inter=3584),
}


def small_preset(size: str, layout: str = "hybrid", moe: bool = False, **overrides: Any) -> KimiLinearConfig:
    """A small trainable configuration.

    Args:
        size: ``"tiny"`` (~9M, CPU quickstart), ``"20m"``, ``"100m"``, ``"500m"`` (dense totals with a
            32000-token vocabulary; ``kimi-linear model info --preset NAME`` prints exact counts).
        layout: ``"hybrid"`` (3 KDA : 1 MLA, MLA at every 4th layer), ``"kda"`` (all KDA), ``"mla"``
            (all MLA), ``"gdn"`` (the hybrid with Gated DeltaNet in place of KDA).
        moe: MoE MLPs (8 experts, top-2, one shared expert, expert width = dense width / 4; the first
            layer stays dense).
    """
    s = _SIZES[size]
    L = s["layers"]
    if layout == "kda":
        kda = list(range(1, L + 1))
    elif layout == "mla":
        kda = []
    else:
        kda = [i for i in range(1, L + 1) if i % 4 != 0]
    full = [i for i in range(1, L + 1) if i not in kda]
    cfg: dict[str, Any] = dict(
        vocab_size=32000, hidden_size=s["hidden"], intermediate_size=s["inter"], num_hidden_layers=L,
        num_attention_heads=s["mla_heads"], num_key_value_heads=s["mla_heads"], head_dim=s["hidden"] // s["mla_heads"],
        kv_lora_rank=s["kv_lora"], qk_nope_head_dim=s["nope"], qk_rope_head_dim=s["rope"], v_head_dim=s["v"],
        linear_attn_config={"full_attn_layers": full, "head_dim": s["head_dim"], "kda_layers": kda,
                            "num_heads": s["heads"], "short_conv_kernel_size": 4},
        num_experts=8 if moe else None, num_experts_per_token=2, num_shared_experts=1,
        moe_intermediate_size=max(s["inter"] // 4, 8), first_k_dense_replace=1, routed_scaling_factor=1.0,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, model_max_length=1 << 20, dtype="float32",
        kda_variant="gdn" if layout == "gdn" else "kda",
    )
    cfg.update(overrides)
    return KimiLinearConfig(**cfg)


def list_presets() -> list[str]:
    """Every name :meth:`KimiLinearConfig.preset` accepts (besides aliases of the 48B model)."""
    names = ["kimi_linear_48b_a3b"]
    for size in _PRESET_SIZES:
        for layout in _PRESET_LAYOUTS:
            base = size if layout == "hybrid" else f"{size}-{layout}"
            names += [base, f"{base}-moe"]
    return names
