"""``kimi-linear model``: inspect model configurations without allocating weights.

    kimi-linear model presets                      # every preset with its parameter counts
    kimi-linear model info --preset 100m-moe       # layout and counts of one preset
    kimi-linear model info --config path/to/dir    # ... of a checkpoint's config.json
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("model", help="model presets, layouts and parameter counts")
    sub = p.add_subparsers(dest="model_command", metavar="ACTION")
    info = sub.add_parser("info", help="layout and parameter counts of a preset or a config.json")
    src = info.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", help="preset name (see `kimi-linear model presets`)")
    src.add_argument("--config", help="a checkpoint directory or a config.json path")
    info.set_defaults(handler=run_info)
    presets = sub.add_parser("presets", help="list presets with their parameter counts")
    presets.set_defaults(handler=run_presets)
    p.set_defaults(handler=lambda args: (p.print_help(), 0)[1])


def counts(config) -> dict[str, int]:
    """Total / active / non-embedding parameter counts of ``config``, built on the meta device."""
    import torch

    from kimi_linear.model.modeling import KimiLinearForCausalLM

    with torch.device("meta"):
        model = KimiLinearForCausalLM(config, init=False)
    return {
        "total": model.num_parameters(),
        "active": model.num_parameters(active=True),
        "non_embedding": model.num_parameters(exclude_embeddings=True),
        "tensors": len(model.state_dict()),
        "checkpoint_values": sum(t.numel() for t in model.state_dict().values()),  # + router biases
    }


def _human(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def _load(args: argparse.Namespace):
    import os

    from kimi_linear.model.config import KimiLinearConfig

    if args.preset:
        return KimiLinearConfig.preset(args.preset)
    path = args.config
    return KimiLinearConfig.from_json_file(os.path.join(path, "config.json") if os.path.isdir(path) else path)


def run_info(args: argparse.Namespace) -> int:
    cfg = _load(args)
    c = counts(cfg)
    layout = "".join("K" if t == "kda" else "M" for t in cfg.layer_types())
    mlp = "".join("E" if cfg.is_moe_layer(i) else "d" for i in range(cfg.num_hidden_layers))
    rows = [
        ("layers", f"{cfg.num_hidden_layers}  attention {layout} (K=KDA [{cfg.kda_variant}], M=MLA)"),
        ("mlp", f"{mlp} (E=MoE {cfg.num_experts}x top-{cfg.num_experts_per_token}, d=dense)"
         if cfg.num_experts else f"{mlp} (d=dense)"),
        ("hidden / vocab", f"{cfg.hidden_size} / {cfg.vocab_size}"),
        ("KDA heads x dim", f"{cfg.kda_num_heads} x {cfg.kda_head_dim}" if cfg.linear_attn_config else "-"),
        ("MLA heads", f"{cfg.num_attention_heads} (nope {cfg.qk_nope_head_dim}, rope {cfg.qk_rope_head_dim}, "
                      f"v {cfg.v_head_dim}, latent {cfg.kv_lora_rank})"),
        ("parameters", f"{c['total']:,} ({_human(c['total'])})"),
        ("active / token", f"{c['active']:,} ({_human(c['active'])})"),
        ("non-embedding", f"{c['non_embedding']:,} ({_human(c['non_embedding'])})"),
        ("checkpoint", f"{c['tensors']:,} tensors, {c['checkpoint_values']:,} values (with router biases)"),
    ]
    for k, v in rows:
        print(f"{k + ':':18s}{v}")
    return 0


def run_presets(args: argparse.Namespace) -> int:
    from kimi_linear.model.config import KimiLinearConfig, list_presets

    print(f"{'preset':24s}{'total':>10s}{'active':>10s}  layout")
    for name in list_presets():
        cfg = KimiLinearConfig.preset(name)
        c = counts(cfg)
        layout = "".join("K" if t == "kda" else "M" for t in cfg.layer_types())
        print(f"{name:24s}{_human(c['total']):>10s}{_human(c['active']):>10s}  {layout}"
              f"{' (gdn)' if cfg.kda_variant == 'gdn' else ''}")
    return 0
