"""Choosing the next token from logits: greedy, temperature, top-k, top-p, repetition penalty.

All functions take ``logits [B, V]`` (any float dtype; the work is done in fp32) and are free of host
syncs, so the sampling step can live inside a captured CUDA graph. Randomness comes only from the
``torch.Generator`` passed in: the same seed gives the same tokens.

Order of operations (as in common practice): repetition penalty -> temperature -> top-k -> top-p ->
sample (or argmax when ``do_sample`` is False; the penalty still applies to greedy decoding).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingConfig:
    """How to pick tokens. ``top_k=0`` and ``top_p=1.0`` disable those filters; ``repetition_penalty=1.0``
    disables the penalty."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 (use do_sample=False for greedy), got {self.temperature}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0 (1.0 = off), got {self.repetition_penalty}")


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Make tokens already in the sequence less likely: a seen token's logit ``x`` becomes ``x / penalty``
    if ``x > 0`` else ``x * penalty`` (CTRL, Keskar et al. 2019).

    | arg    | shape      | dtype |
    |--------|------------|-------|
    | logits | ``[B, V]`` | float |
    | seen   | ``[B, V]`` | bool (True where the token occurred in the prompt or output) |
    """
    if penalty == 1.0:
        return logits
    if seen.shape != logits.shape:
        raise ValueError(f"seen must be [B, V] = {tuple(logits.shape)}, got {tuple(seen.shape)}")
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` largest logits per row (ties at the k-th value kept), set the rest to ``-inf``."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability reaches ``p``
    (always at least the most likely one); set the rest to ``-inf``."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above this one
    drop_sorted = mass_before >= p
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def next_token(
    logits: torch.Tensor,
    config: SamplingConfig,
    *,
    seen: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick one token per row. ``logits [B, V]`` -> ``[B]`` int64.

    ``seen [B, V]`` bool is needed only with a repetition penalty; ``generator`` (on the logits'
    device) makes sampling reproducible.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [B, V], got shape {tuple(logits.shape)}")
    x = logits.float()
    if config.repetition_penalty != 1.0:
        if seen is None:
            raise ValueError("repetition_penalty != 1 needs `seen` [B, V], the tokens already in each sequence")
        x = apply_repetition_penalty(x, seen, config.repetition_penalty)
    if not config.do_sample:
        return x.argmax(dim=-1)
    x = x / config.temperature
    x = top_k_filter(x, config.top_k)
    x = top_p_filter(x, config.top_p)
    probs = torch.softmax(x, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def mark_seen(seen: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """In place: set ``seen[b, tokens[b, t]] = True`` for every (unmasked) token. ``tokens [B, T]`` or ``[B]``."""
    if tokens.dim() == 1:
        tokens = tokens.unsqueeze(1)
        mask = None if mask is None else mask.reshape(-1, 1)
    src = torch.ones_like(tokens, dtype=torch.bool) if mask is None else mask.bool()
    # scatter_reduce with amax is an OR over booleans; done in uint8 since bool scatter-reduce is patchy.
    as_u8 = seen.to(torch.uint8)
    as_u8.scatter_reduce_(1, tokens, src.to(torch.uint8), reduce="amax")
    seen.copy_(as_u8.bool())
    return seen
