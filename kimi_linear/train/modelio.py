"""How the trainer talks to a model: build it, call it, save and load it, balance its MoE.

The trainer needs only a small protocol from a model, so tests can use a tiny stand-in:

- ``forward(input_ids, labels=None, [cu_seqlens=None])`` returning an object with ``.loss``
  (mean cross-entropy over positions whose shifted label is not -100, HF style) and ``.logits``;
- ``save_pretrained(directory)`` and a class method ``from_pretrained(directory)``;
- optionally, a MoE balancing hook (see :func:`moe_balance_step`) and
  ``gradient_checkpointing_enable()`` / a ``gradient_checkpointing`` attribute.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F

from kimi_linear.train.config import TrainConfig

IGNORE = -100


def round_vocab(n: int, multiple: int = 64) -> int:
    return ((n + multiple - 1) // multiple) * multiple


def model_config(cfg: TrainConfig, tokenizer) -> object:
    """The KimiLinearConfig for a run: a preset name, a config.json, or a checkpoint directory."""
    from kimi_linear.model.config import KimiLinearConfig

    spec = cfg.model
    overrides = dict(cfg.model_overrides)
    if os.path.isdir(spec):
        mc = KimiLinearConfig.from_pretrained(spec)
    elif os.path.isfile(spec):
        mc = KimiLinearConfig.from_json_file(spec)
    else:
        mc = KimiLinearConfig.preset(spec)
    if "vocab_size" not in overrides and mc.vocab_size < tokenizer.vocab_size:
        overrides["vocab_size"] = round_vocab(tokenizer.vocab_size)
    elif "vocab_size" not in overrides and not (os.path.isdir(spec) or os.path.isfile(spec)):
        overrides["vocab_size"] = round_vocab(tokenizer.vocab_size)  # presets follow the tokenizer
    for key, val in list(overrides.items()):  # dict fields (linear_attn_config) merge key by key
        base = getattr(mc, key, None)
        if isinstance(val, dict) and isinstance(base, dict):
            overrides[key] = {**base, **val}
    overrides.setdefault("bos_token_id", tokenizer.bos_id)
    overrides.setdefault("eos_token_id", tokenizer.eos_id)
    overrides.setdefault("pad_token_id", tokenizer.pad_id)
    mc = mc.replace(**overrides) if overrides else mc
    mc.validate()
    if mc.vocab_size < tokenizer.vocab_size:
        raise ValueError(f"model vocab_size={mc.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size}")
    return mc


def build_model(cfg: TrainConfig, tokenizer) -> torch.nn.Module:
    """A freshly initialised KimiLinearForCausalLM (fp32 weights; autocast handles bf16)."""
    from kimi_linear.model.modeling import KimiLinearForCausalLM

    mc = model_config(cfg, tokenizer)
    model = KimiLinearForCausalLM(mc)
    if cfg.init_from:
        load_weights(model, cfg.init_from)
    return model.float()


def load_weights(model: torch.nn.Module, directory: str | os.PathLike) -> None:
    """Copy the weights saved in ``directory`` (official format) into ``model`` exactly."""
    loaded = type(model).from_pretrained(str(directory))
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint {directory} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")


def accepts(fn: Callable, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values())


def supports_varlen(model: torch.nn.Module) -> bool:
    """Does ``model.forward`` take packed input (``cu_seqlens``)? Probed with a 2-token pack."""
    if "cu_seqlens" not in inspect.signature(model.forward).parameters and not accepts(model.forward, "cu_seqlens"):
        return False
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            dev = next(model.parameters()).device
            model(input_ids=torch.zeros(1, 2, dtype=torch.long, device=dev),
                  cu_seqlens=torch.tensor([0, 1, 2], dtype=torch.int32, device=dev))
        return True
    except (NotImplementedError, TypeError):
        return False
    finally:
        model.train(was_training)


def enable_grad_checkpointing(model: torch.nn.Module) -> None:
    if hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable()
    elif hasattr(model, "gradient_checkpointing"):
        model.gradient_checkpointing = True
    else:
        raise ValueError(f"grad_checkpointing=True but {type(model).__name__} has no gradient checkpointing switch")


def loss_and_count(model: torch.nn.Module, batch: dict[str, torch.Tensor], z_loss: float) -> tuple[torch.Tensor, int]:
    """Mean token loss of a micro-batch (plus z-loss) and its number of scored tokens.

    With ``z_loss > 0`` the loss is computed here from the logits:
    ``CE + z_loss * mean(logsumexp(logits)^2)`` over scored positions (keeps the softmax normaliser
    near 1, which keeps bf16 logits well conditioned).
    """
    labels = batch["labels"]
    n = int((labels[:, 1:] != IGNORE).sum())
    kwargs = {"input_ids": batch["input_ids"]}
    if "cu_seqlens" in batch:
        kwargs["cu_seqlens"] = batch["cu_seqlens"]
    if z_loss == 0.0:
        out = model(**kwargs, labels=labels)
        return out.loss, n
    out = model(**kwargs)
    logits = out.logits[:, :-1].float()
    tgt = labels[:, 1:]
    mask = tgt != IGNORE
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=IGNORE, reduction="sum")
    lse = torch.logsumexp(logits, dim=-1)
    z = (lse.square() * mask).sum()
    denom = max(n, 1)
    return (ce + z_loss * z) / denom, n


# --------------------------------------------------------------------------- MoE balancing
def moe_balance_step(model: torch.nn.Module, rate: float, all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict | None:
    """Aux-loss-free load balancing after an optimizer step; returns load statistics or None.

    Uses the model's own hook when it has one (``update_moe_bias(rate)`` / ``moe_balance_update``),
    else updates every router with ``e_score_correction_bias`` and a per-expert token count
    (``expert_load`` / ``tokens_per_expert``) itself: ``bias += rate * sign(mean_load - load)`` so
    under-used experts become likelier picks. Counts are summed over ranks first, so every rank
    applies the same update.
    """
    if rate <= 0:
        return None
    # KimiLinearForCausalLM: expert_loads() [layers, E] accumulated in forward, update_moe_bias(rate, loads)
    loads_fn, update_fn = getattr(model, "expert_loads", None), getattr(model, "update_moe_bias", None)
    if callable(loads_fn) and callable(update_fn):
        loads = loads_fn()
        if loads is None:
            return None
        loads = loads.detach().float().clone()
        if all_reduce is not None:
            loads = all_reduce(loads)
        update_fn(rate, loads)
        mean = loads.mean(dim=-1).clamp_min(1e-9)
        return {"max_over_mean": float((loads.max(dim=-1).values / mean).max()), "routers": int(loads.shape[0])}
    stats = {"max_over_mean": 0.0, "routers": 0}
    with torch.no_grad():
        for mod in model.modules():
            bias = getattr(mod, "e_score_correction_bias", None)
            load = getattr(mod, "expert_load", None)
            if load is None:
                load = getattr(mod, "tokens_per_expert", None)
            if bias is None or load is None or not isinstance(load, torch.Tensor):
                continue
            load = load.detach().float().clone()
            if all_reduce is not None:
                load = all_reduce(load)
            if load.sum() <= 0:
                continue
            mean = load.mean()
            bias.add_(rate * torch.sign(mean - load).to(bias.dtype))
            stats["max_over_mean"] = max(stats["max_over_mean"], float(load.max() / mean))
            stats["routers"] += 1
            if hasattr(load, "zero_"):
                getattr(mod, "expert_load" if hasattr(mod, "expert_load") else "tokens_per_expert").zero_()
    return stats if stats["routers"] else None
