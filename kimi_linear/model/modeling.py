"""``KimiLinearModel`` and ``KimiLinearForCausalLM``: embedding, pre-norm hybrid blocks, final norm, head.

Block ``l`` (0-based) is ``h += attn(input_layernorm(h)); h += ffn(post_attention_layernorm(h))`` with
``attn`` a :class:`KimiDeltaAttention` or :class:`MultiHeadLatentAttention` (``config.layer_types()``)
and ``ffn`` a dense :class:`SwiGLUMLP` (``mlp``) or a :class:`SparseMoeBlock` (``block_sparse_moe``).
Module names are the checkpoint's (``model.layers.L....``, ``lm_head``), so ``state_dict()`` is the
on-disk tensor table.

``cache`` is threaded from ``KimiLinearForCausalLM.forward`` through every block to every attention
layer (which finds its own state by ``layer_idx``); the cached paths come with the generation module.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from kimi_linear.backends import resolve_backend
from kimi_linear.layers.common import RMSNorm
from kimi_linear.layers.kda import KimiDeltaAttention, ShortConvolution, _HeadNorm
from kimi_linear.layers.mla import MultiHeadLatentAttention
from kimi_linear.layers.moe import MoEGate, SparseMoeBlock, SwiGLUMLP
from kimi_linear.model.config import KimiLinearConfig
from kimi_linear.ops.moe_decode import moe_decode
from kimi_linear.ops.norm import add_rms_norm
from kimi_linear.ops.prefetch import join_prefetches

__all__ = ["CausalLMOutput", "KimiLinearDecoderLayer", "KimiLinearModel", "KimiLinearForCausalLM"]

# The batch-1 decode step on Triton folds each block's two RMSNorms and residual adds into the launches
# around them instead of running an add + norm launch between sub-blocks (54 launches, ~0.1 ms per step
# on an H100; docs/decode.md): the norms into the input projections, the router and the experts' gate/up
# kernel (each consumer is linear in the normed x, so it scales its sums by the row's rstd), the adds
# into the output projection's and the down kernel's epilogues. False: the unfolded step (benchmarks
# compare both: ``decode_profile.py --no-fold-norms``).
FOLD_DECODE_NORMS = True


@dataclass
class CausalLMOutput:
    """What :meth:`KimiLinearForCausalLM.forward` returns.

    Attributes:
        loss: mean next-token cross entropy over labels != -100 (None without labels).
        logits: ``[B, T', vocab]`` (T' = T, or ``logits_to_keep``).
        cache: the cache object passed in (updated in place by the cached paths), else None.
        hidden_states: final-norm hidden states ``[B, T, D]`` when ``output_hidden_states``.
        aux: extra information (``"num_tokens"``: label tokens counted in the loss).
    """

    loss: torch.Tensor | None
    logits: torch.Tensor
    cache: Any = None
    hidden_states: torch.Tensor | None = None
    aux: dict[str, Any] = field(default_factory=dict)


class KimiLinearDecoderLayer(nn.Module):
    """One pre-norm block: attention (KDA or MLA) then MLP (dense or MoE), each with a residual."""

    def __init__(self, config: KimiLinearConfig, layer_idx: int, backend: str = "auto") -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.backend = backend
        self.layer_type = config.layer_types()[layer_idx]
        self.self_attn: nn.Module = (
            KimiDeltaAttention(config, layer_idx, backend) if self.layer_type == "kda"
            else MultiHeadLatentAttention(config, layer_idx, backend)
        )
        self.is_moe = config.is_moe_layer(layer_idx)
        if self.is_moe:
            self.block_sparse_moe = SparseMoeBlock(config)
        else:
            self.mlp = SwiGLUMLP(config.hidden_size, config.intermediate_size)
            # the one-token decode step on Triton runs the dense MLP as a single "expert" of weight 1
            # through the MoE decode kernels (two launches with SwiGLU inside, against five cuBLAS /
            # elementwise ones); their index and weight, made once (not in the state dict)
            self.register_buffer("_dense_index", torch.zeros(1, 1, dtype=torch.long), persistent=False)
            self.register_buffer("_dense_weight", torch.ones(1, 1), persistent=False)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, backend)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, backend)

    def reset_buffers(self) -> None:
        """Fill the non-persistent buffers (not in a checkpoint; garbage after ``to_empty``)."""
        if not self.is_moe:
            self._dense_index.zero_()
            self._dense_weight.fill_(1.0)

    @property
    def ffn(self) -> nn.Module:
        return self.block_sparse_moe if self.is_moe else self.mlp

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache: Any = None, *, pending: torch.Tensor | None = None, unsummed: bool = False,
                **kwargs: Any) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        """``[B, T, D]`` -> ``[B, T, D]``; ``cache`` goes to the attention layer unchanged.

        ``pending``: the previous block's MLP output, not yet added to ``hidden_states``; ``unsummed``:
        return ``(h, mlp_out)`` instead of their sum. The model chains blocks this way so that each
        residual add shares a launch with the norm that follows it (:func:`add_rms_norm`), same values.
        (A keyword of ``forward`` rather than a method of its own, so that wrappers such as FSDP2,
        which gather parameters around ``forward``, see every call.)

        The batch-1 decode step folds the norms and adds into the neighbouring kernels instead
        (:data:`FOLD_DECODE_NORMS`, :meth:`_decode_folded`); it returns ``(h, None)`` when ``unsummed``:
        nothing is left pending."""
        if self._folds_norms(hidden_states, cache):
            if pending is not None:  # the block before this one did not fold: its add comes first
                hidden_states = hidden_states + pending
            h = self._decode_folded(hidden_states, attention_mask, cache, **kwargs)
            return (h, None) if unsummed else h
        ln = self.input_layernorm
        if pending is None:
            x = ln(hidden_states)
        else:
            hidden_states, x = add_rms_norm(hidden_states, pending, ln.weight, ln.eps, backend=ln.backend)
        attn_out = self.self_attn(x, attention_mask, cache, **kwargs)
        post = self.post_attention_layernorm
        h, x = add_rms_norm(hidden_states, attn_out, post.weight, post.eps, backend=post.backend)
        decode = cache is not None and getattr(cache.step, "decode", False)
        if self.is_moe and decode:
            out = self._moe_decode(x.reshape(-1, x.shape[-1])).view(x.shape)
        elif decode and x.shape[0] * x.shape[1] == 1 and resolve_backend(self.backend, x.device) == "triton":
            out = self._dense_decode(x.reshape(1, -1)).view(x.shape)
        else:
            out = self.ffn(x, attention_mask=attention_mask, **kwargs)
        return (h, out) if unsummed else h + out

    def _folds_norms(self, hidden_states: torch.Tensor, cache: Any) -> bool:
        """Does this call take the folded decode step: :data:`FOLD_DECODE_NORMS`, a decode step of one
        token in all, the Triton backend, and for a MoE block a shared expert that runs in the experts'
        launches (or none; a separate shared MLP would need the normalised x anyway)."""
        if not FOLD_DECODE_NORMS or cache is None or not getattr(cache.step, "decode", False):
            return False
        if hidden_states.dim() != 3 or hidden_states.shape[0] * hidden_states.shape[1] != 1:
            return False
        if resolve_backend(self.backend, hidden_states.device) != "triton":
            return False
        if not self.is_moe:
            return True
        return self.block_sparse_moe.shared_experts is None or self._shared_expert_weights() is not None

    def _decode_folded(self, h: torch.Tensor, attention_mask: torch.Tensor | None, cache: Any,
                       **kwargs: Any) -> torch.Tensor:
        """The one-token decode step with the block's norms and residual adds folded into the kernels
        around them: ``h [1, 1, D]`` (the summed residual stream) -> the next block's ``h``.

        ``h + attn(input_layernorm(h))``: the norm inside the attention's input projections, the add in
        its output projection's epilogue; ``h + ffn(post_attention_layernorm(h))``: the norm inside the
        router and the experts' gate/up kernel, the add in the down kernel's epilogue."""
        ln, post = self.input_layernorm, self.post_attention_layernorm
        h = self.self_attn(h, attention_mask, cache, input_norm=(ln.weight, ln.eps), residual=h, **kwargs)
        flat = h.reshape(1, -1)
        fold = dict(norm_weight=post.weight, eps=post.eps, residual=flat)
        out = self._moe_decode(flat, **fold) if self.is_moe else self._dense_decode(flat, **fold)
        return out.view(h.shape)

    def _dense_decode(self, x: torch.Tensor, **fold: Any) -> torch.Tensor:
        """The dense MLP of the one-token Triton decode step, ``x [1, D]``: one "expert" of weight 1
        through the MoE decode kernels (two launches with SwiGLU inside, against five cuBLAS /
        elementwise ones). ``fold``: :func:`moe_decode`'s ``norm_weight``, ``eps``, ``residual``."""
        mlp = self.mlp
        return moe_decode(x, self._dense_index, self._dense_weight, [mlp.gate_proj.weight], [mlp.up_proj.weight],
                          [mlp.down_proj.weight], backend=self.backend, **fold)

    def _shared_expert_weights(self) -> tuple[list, list, list] | None:
        """The shared expert's ``([w1], [w3], [w2])`` when it has a routed expert's size (it then runs
        in the same launches as the routed ones), else None."""
        se, w1 = self.block_sparse_moe.shared_experts, self.block_sparse_moe.experts[0].w1.weight
        if se is None or se.gate_proj.weight.shape != w1.shape:
            return None
        return [se.gate_proj.weight], [se.up_proj.weight], [se.down_proj.weight]

    def _moe_decode(self, x: torch.Tensor, *, norm_weight: torch.Tensor | None = None, eps: float = 1e-6,
                    residual: torch.Tensor | None = None) -> torch.Tensor:
        """Cached decode step, ``x [N, D]`` -> ``[N, D]``: the same routing, routed experts through the
        sync-free kernel (so the step can be captured in a CUDA graph; each chosen expert's weights are
        read once); reference on CPU. ``norm_weight`` / ``eps``: x is not yet normalised (the router and
        the experts fold the norm in); ``residual``: returns ``residual + output``."""
        moe = self.block_sparse_moe
        shared = self._shared_expert_weights()
        # a shared expert of another size runs as its own MLP on the normalised x: the folded step never
        # takes such a block (_folds_norms), so only the unfolded one reaches it
        separate = moe.shared_experts is not None and shared is None
        if separate and (norm_weight is not None or residual is not None):
            raise ValueError("a shared expert of another size than the routed ones cannot fold the norm / residual")
        weights, indices = moe.route(x, backend=self.backend, norm_weight=norm_weight, eps=eps)
        w1, w3, w2 = ([e.w1.weight for e in moe.experts], [e.w3.weight for e in moe.experts],
                      [e.w2.weight for e in moe.experts])
        # x_ready: the router's launch, just before, read x; nothing since has written it
        y = moe_decode(x, indices, weights, w1, w3, w2, shared=shared, norm_weight=norm_weight, eps=eps,
                       residual=residual, x_ready=True, backend=self.backend)
        return y + moe.shared_experts(x) if separate else y


class KimiLinearModel(nn.Module):
    """Embedding, decoder layers, final norm. ``forward`` returns the final hidden states ``[B, T, D]``."""

    def __init__(self, config: KimiLinearConfig, backend: str = "auto") -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            [KimiLinearDecoderLayer(config, i, backend) for i in range(config.num_hidden_layers)]
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, backend)
        self.gradient_checkpointing = False

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        try:
            return self._forward(input_ids, attention_mask, cache, inputs_embeds, kwargs)
        finally:
            join_prefetches()  # the decode step's L2 prefetches (ops/prefetch.py) end with the forward

    def _forward(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None, cache: Any,
                 inputs_embeds: torch.Tensor | None, kwargs: dict[str, Any]) -> torch.Tensor:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids [B, T] or inputs_embeds [B, T, D]")
        if input_ids is not None:
            if input_ids.dim() != 2:
                raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
            h = self.embed_tokens(input_ids)
        else:
            h = inputs_embeds
        if cache is not None and getattr(cache, "step", False) is None:
            # One cache step spans all layers: opened here (the input is validated before any layer
            # writes) and committed once every layer has stored this call's tokens.
            cache.begin_step(h.shape[1], attention_mask)
            try:
                h = self._run_layers_and_norm(h, attention_mask, cache, kwargs)
            except BaseException:
                cache.abort_step()
                raise
            cache.commit_step()
            return h
        return self._run_layers_and_norm(h, attention_mask, cache, kwargs)

    def _run_layers_and_norm(self, h: torch.Tensor, attention_mask: torch.Tensor | None, cache: Any,
                             kwargs: dict[str, Any]) -> torch.Tensor:
        """Every block, then the final norm."""
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            for layer in self.layers:
                h = _checkpointed(layer, h, attention_mask, cache, kwargs)
            return self.norm(h)
        # each block's last residual add is left to the next block's first norm (and the final norm),
        # one launch each instead of two; a folded decode block (FOLD_DECODE_NORMS) leaves none pending,
        # and the final norm is then a plain one
        pending = None
        for layer in self.layers:
            h, pending = layer(h, attention_mask, cache, pending=pending, unsummed=True, **kwargs)
        if pending is None:  # no layers
            return self.norm(h)
        return add_rms_norm(h, pending, self.norm.weight, self.norm.eps, backend=self.norm.backend)[1]


def _checkpointed(layer: nn.Module, h: torch.Tensor, mask: torch.Tensor | None, cache: Any,
                  kwargs: dict[str, Any]) -> torch.Tensor:
    """Run ``layer`` under activation checkpointing; the backward recompute does not count MoE load twice."""
    calls = [0]

    def run(x: torch.Tensor, m: torch.Tensor | None) -> torch.Tensor:
        calls[0] += 1
        return layer(x, m, cache, **{**kwargs, "count_load": calls[0] == 1})

    return checkpoint(run, h, mask, use_reentrant=False)


class KimiLinearForCausalLM(nn.Module):
    """The language model: :class:`KimiLinearModel` + untied ``lm_head``.

    Args:
        config: the model configuration.
        backend: KDA operator backend for every KDA layer (``"auto" | "triton" | "reference"``).
        init: initialise weights (skipped automatically on the meta device).
    """

    def __init__(self, config: KimiLinearConfig, backend: str = "auto", init: bool = True) -> None:
        super().__init__()
        if config.tie_word_embeddings:
            raise ValueError("tie_word_embeddings=true is not supported (the released model unties the head)")
        self.config = config
        self.model = KimiLinearModel(config, backend)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if init and not self.lm_head.weight.is_meta:
            self.init_weights()

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0, initializer_range) projections and embeddings; residual-output projections scaled
        by ``1/sqrt(2 * layers)`` (so the residual stream's variance does not grow with depth); norms at 1;
        KDA decays spread (:meth:`KimiDeltaAttention.reset_gate_parameters`); zero balancing biases."""
        std = self.config.initializer_range
        out_std = std / math.sqrt(2 * self.config.num_hidden_layers)
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                residual_out = name.endswith(("o_proj", "down_proj", "w2"))
                nn.init.normal_(m.weight, std=out_std if residual_out else std)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=std)
            elif isinstance(m, (RMSNorm, _HeadNorm, ShortConvolution)):
                m.reset_parameters()
            elif isinstance(m, KimiDeltaAttention):
                m.reset_gate_parameters()
            elif isinstance(m, MoEGate):
                nn.init.normal_(m.weight, std=std)
                m.e_score_correction_bias.zero_()

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        cache: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        output_hidden_states: bool = False,
        **kwargs: Any,
    ) -> CausalLMOutput:
        """Logits (and the loss when ``labels`` is given).

        | arg            | shape / meaning                                                 |
        |----------------|-----------------------------------------------------------------|
        | input_ids      | ``[B, T]`` int                                                  |
        | attention_mask | ``[B, T]``, 1 = real token (left or right padding)              |
        | labels         | ``[B, T]``, aligned with input_ids (shifted inside), -100 = ignore |
        | cache          | passed to every attention layer (generation module)             |
        | logits_to_keep | 0 = all positions, n = the last n                               |
        """
        h = self.model(input_ids, attention_mask, cache, inputs_embeds, **kwargs)
        hk = h if logits_to_keep == 0 else h[:, -logits_to_keep:]
        logits = self.lm_head(hk)
        loss, aux = None, {}
        if labels is not None:
            if labels.shape != h.shape[:2]:
                raise ValueError(f"labels must be [B, T] = {tuple(h.shape[:2])}, got {tuple(labels.shape)}")
            if logits_to_keep != 0:
                raise ValueError("labels need all logits; pass logits_to_keep=0")
            target = labels[:, 1:]
            # mean over scored tokens; a batch with none scores 0 (not NaN, as a plain mean would),
            # without reading the count on the host
            count = (target != -100).sum()
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), target.flatten(), ignore_index=-100,
                                   reduction="sum") / count.clamp_min(1)
            aux["num_tokens"] = count
        return CausalLMOutput(loss=loss, logits=logits, cache=cache,
                              hidden_states=h if output_hidden_states else None, aux=aux)

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> Any:
        """Generate tokens (batched, left-padded prompts; greedy or sampled; streaming callback).

        Delegates to :func:`kimi_linear.generation.generate.generate` (arguments and the returned
        ``GenerationOutput`` are documented there); imported lazily since generation builds on the model.
        """
        from kimi_linear.generation.generate import generate

        return generate(self, input_ids, attention_mask, **kwargs)

    # ------------------------------------------------------------------ utilities
    def set_backend(self, backend: str) -> None:
        """Switch the KDA operator backend of every KDA layer."""
        for m in self.modules():
            if isinstance(m, KimiDeltaAttention):
                m.backend = backend

    def pack_experts_(self) -> int:
        """Lay every MoE layer's routed experts out in two buffers each
        (:meth:`kimi_linear.layers.moe.SparseMoeBlock.pack_experts_`), so that inference's grouped GEMMs
        read them in place instead of stacking a copy per call (a 4K prefill of the decode benchmark's
        model: 7.3 ms of copies). Same values, names and checkpoints. Returns the layers packed."""
        from kimi_linear.layers.moe import SparseMoeBlock

        return sum(int(m.pack_experts_()) for m in self.modules() if isinstance(m, SparseMoeBlock))

    def gradient_checkpointing_enable(self, enabled: bool = True) -> None:
        """Recompute each block's activations in the backward pass (less memory, ~1/3 more compute)."""
        self.model.gradient_checkpointing = enabled

    def num_parameters(self, *, exclude_embeddings: bool = False, active: bool = False) -> int:
        """Parameter count (values). ``active``: count only the top-k routed experts of each MoE layer."""
        total = 0
        for name, p in self.named_parameters():
            if exclude_embeddings and name in ("model.embed_tokens.weight", "lm_head.weight"):
                continue
            total += p.numel()
        if active:
            for m in self.modules():
                if isinstance(m, SparseMoeBlock):
                    per_expert = sum(p.numel() for p in m.experts[0].parameters())
                    total -= per_expert * (m.num_experts - m.top_k)
        return total

    def moe_blocks(self) -> list[SparseMoeBlock]:
        return [m for m in self.modules() if isinstance(m, SparseMoeBlock)]

    def expert_loads(self) -> torch.Tensor | None:
        """Accumulated per-expert token counts, ``[num_moe_layers, E]`` (None without MoE)."""
        blocks = self.moe_blocks()
        return torch.stack([b.expert_load for b in blocks]) if blocks else None

    @torch.no_grad()
    def update_moe_bias(self, rate: float, loads: torch.Tensor | None = None) -> None:
        """Balancing step on every MoE layer (see :meth:`SparseMoeBlock.update_correction_bias`).

        ``loads [num_moe_layers, E]`` overrides the accumulated counts (e.g. all-reduced across ranks).
        """
        for i, block in enumerate(self.moe_blocks()):
            block.update_correction_bias(rate, None if loads is None else loads[i])

    # ------------------------------------------------------------------ checkpoints
    def save_pretrained(self, directory: str | os.PathLike, *, max_shard_size: int | str = "5GB") -> None:
        """Write ``config.json`` + safetensors (sharded with an index above ``max_shard_size``), atomically."""
        from kimi_linear.model.checkpoint import save_pretrained

        save_pretrained(self, directory, max_shard_size=max_shard_size)

    @classmethod
    def from_pretrained(
        cls,
        directory: str | os.PathLike,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str | None = None,
        backend: str = "auto",
        strict: bool = True,
        **config_overrides: Any,
    ) -> KimiLinearForCausalLM:
        """Load a checkpoint directory (ours, the released one, or one transformers saved).

        ``device="meta"`` checks names and shapes against the files without reading any tensor data.
        ``dtype`` (default: the config's ``dtype``) applies to every tensor except the fp32 gate and
        router-bias parameters.
        """
        from kimi_linear.model.checkpoint import from_pretrained

        return from_pretrained(cls, directory, device=device, dtype=dtype, backend=backend, strict=strict,
                               **config_overrides)
