"""``KimiDeltaAttention``: the linear-attention layer of Kimi Linear (and its GDN / decay-only baselines).

    x -> q, k, v = SiLU(ShortConv(W_{q,k,v} x))           [B, T, H, K], [B, T, H, V]
    g    = -exp(A_log) * softplus(f_b(f_a(x)) + dt_bias)     [B, T, H, K]   (fp32, low rank K)
    beta = sigmoid(b_proj(x))                               [B, T, H]
    o    = KDA(l2norm(q), l2norm(k), v, g, beta)            [B, T, H, V]
    y    = o_proj( RMSNorm(o) * sigmoid(g_b(g_a(x))) )      [B, T, D]

Parameter names and shapes are those of the released checkpoint. ``config.kda_variant`` swaps the
operator for a baseline with otherwise the same layer: ``"gdn"`` (one decay per head: ``f_b_proj``
maps to H values, ``dt_bias [H]``, the decay is broadcast over K) and ``"decay"`` (per-channel decay,
no delta rule, reference operator only).

On the Triton backend the L2 norm, gate and beta sigmoid are fused into the kernel (``KDAFusion``);
on the reference backend they are computed here in plain PyTorch. Both give the same result.

Padding: positions where ``attention_mask == 0`` are zeroed before the projections (so they feed
zeros to the short conv of later tokens) and get ``g = 0, beta = 0``, so they neither write into nor
decay the recurrent state: real tokens see exactly what they would see without the pads.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from kimi_linear.backends import resolve_backend
from kimi_linear.layers.common import KeepFP32, add_residual, apply_input_norm, bool_mask
from kimi_linear.ops.conv import causal_conv1d
from kimi_linear.ops.gemv import few_rows_linear, fused_linear
from kimi_linear.ops.kda.chunk import chunk_kda
from kimi_linear.ops.kda.decay_only import chunk_decay
from kimi_linear.ops.kda.fusion import KDAFusion
from kimi_linear.ops.kda.gate import kda_gate_ref, l2norm
from kimi_linear.ops.kda.recurrent import recurrent_kda
from kimi_linear.ops.norm import gated_rms_norm
from kimi_linear.ops.prefetch import prefetch_l2_

__all__ = ["ShortConvolution", "KimiDeltaAttention"]

# The decode step prefetches the layer's output projection into L2 on a side stream while the gates, the
# recurrence and the norm run (a hint; an A/B switch for benchmarks/decode_profile.py --ab kimi_linear.layers.kda:PREFETCH_OUTPUT_PROJECTION)
PREFETCH_OUTPUT_PROJECTION = True


class ShortConvolution(nn.Module):
    """Causal depthwise conv over time, ``weight [D, 1, W]``, no bias, SiLU (see :mod:`kimi_linear.ops.conv`)."""

    def __init__(self, dim: int, kernel_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim, 1, kernel_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Conv1d's default: uniform in +-1/sqrt(fan_in), fan_in = kernel_size for a depthwise filter.
        bound = 1.0 / math.sqrt(self.weight.shape[-1])
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(
        self,
        x: torch.Tensor,
        *,
        initial_window: torch.Tensor | None = None,
        output_final_window: bool = False,
        cu_seqlens: torch.Tensor | None = None,
        backend: str = "auto",
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``x [B, T, D]`` -> ``(y [B, T, D], final_window [N, D, W-1] | None)``; ``backend`` as for
        :func:`~kimi_linear.ops.conv.causal_conv1d` (the layer passes its own)."""
        return causal_conv1d(x, self.weight, None, activation="silu", initial_window=initial_window,
                             output_final_window=output_final_window, cu_seqlens=cu_seqlens, backend=backend)


class KimiDeltaAttention(KeepFP32):
    """Kimi Delta Attention layer.

    Args:
        config: a :class:`kimi_linear.model.config.KimiLinearConfig` (uses ``hidden_size``,
            ``linear_attn_config.{num_heads, head_dim, short_conv_kernel_size}``, ``rms_norm_eps``,
            ``kda_variant``).
        layer_idx: 0-based index in the stack (a cache uses it to find this layer's state).
        backend: ``"auto" | "triton" | "reference"`` for the KDA operator.

    | forward arg     | shape                 |
    |-----------------|-----------------------|
    | hidden_states   | ``[B, T, D]``         |
    | attention_mask  | ``[B, T]`` 1 = real   |
    | return          | ``[B, T, D]``         |
    """

    _keep_fp32 = ("A_log", "dt_bias")

    def __init__(self, config: Any, layer_idx: int = 0, backend: str = "auto") -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.backend = backend
        self.variant = config.kda_variant
        D = config.hidden_size
        H, K = config.kda_num_heads, config.kda_head_dim
        V = K  # the released model uses one head dim for keys and values
        self.num_heads, self.head_k_dim, self.head_v_dim = H, K, V
        self.eps = config.rms_norm_eps
        W = config.conv_kernel_size
        self.q_proj = nn.Linear(D, H * K, bias=False)
        self.k_proj = nn.Linear(D, H * K, bias=False)
        self.v_proj = nn.Linear(D, H * V, bias=False)
        self.q_conv1d = ShortConvolution(H * K, W)
        self.k_conv1d = ShortConvolution(H * K, W)
        self.v_conv1d = ShortConvolution(H * V, W)
        gate_width = H if self.variant == "gdn" else H * K
        self.f_a_proj = nn.Linear(D, K, bias=False)
        self.f_b_proj = nn.Linear(K, gate_width, bias=False)
        self.A_log = nn.Parameter(torch.empty(1, 1, H, 1, dtype=torch.float32))
        self.dt_bias = nn.Parameter(torch.empty(gate_width, dtype=torch.float32))
        self.b_proj = nn.Linear(D, H, bias=False)
        self.g_a_proj = nn.Linear(D, V, bias=False)
        self.g_b_proj = nn.Linear(V, H * V, bias=False)
        self.o_norm = _HeadNorm(V)
        self.o_proj = nn.Linear(H * V, D, bias=False)
        self.reset_gate_parameters()

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def reset_gate_parameters(self, a_range: tuple[float, float] = (1.0, 16.0),
                              dt_range: tuple[float, float] = (1e-3, 1e-1)) -> None:
        """Decay rates that cover short and long memories.

        ``A = exp(A_log)`` is spread log-uniformly over the heads across ``a_range`` (head 0 slowest),
        and each channel's step ``dt = softplus(dt_bias)`` is drawn log-uniformly from ``dt_range``,
        stored through the inverse softplus. The per-token log-decay ``-A * dt`` then spans roughly
        1e-3 (memory of ~1000 tokens) to 1.6 (forgets within a token).
        """
        if self.A_log.is_meta:
            return
        H = self.num_heads
        A = torch.exp(torch.linspace(math.log(a_range[0]), math.log(a_range[1]), H)) if H > 1 else torch.tensor([a_range[0]])
        self.A_log.copy_(A.log().view(1, 1, H, 1))
        lo, hi = math.log(dt_range[0]), math.log(dt_range[1])
        dt = torch.exp(torch.rand(self.dt_bias.shape, device=self.dt_bias.device) * (hi - lo) + lo).clamp_min(1e-4)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus, stable for small dt

    # ------------------------------------------------------------------ steps (cache logic hooks here)
    def project_qkv(
        self,
        x: torch.Tensor,
        *,
        conv_windows: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
        output_conv_windows: bool = False,
        cu_seqlens: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple | None]:
        """Projections + short convs + SiLU. Returns raw ``q, k [B,T,H,K]``, ``v [B,T,H,V]`` and the
        final conv windows ``(q, k, v)`` each ``[N, D, W-1]`` when asked (else None)."""
        B, T, _ = x.shape
        outs, windows = [], []
        for i, (proj, conv) in enumerate(((self.q_proj, self.q_conv1d), (self.k_proj, self.k_conv1d),
                                          (self.v_proj, self.v_conv1d))):
            y, w = conv(proj(x), initial_window=None if conv_windows is None else conv_windows[i],
                        output_final_window=output_conv_windows, cu_seqlens=cu_seqlens, backend=self.backend)
            outs.append(y)
            windows.append(w)
        q = outs[0].view(B, T, self.num_heads, self.head_k_dim)
        k = outs[1].view(B, T, self.num_heads, self.head_k_dim)
        v = outs[2].view(B, T, self.num_heads, self.head_v_dim)
        return q, k, v, (tuple(windows) if output_conv_windows else None)

    def gate_raw(self, x: torch.Tensor) -> torch.Tensor:
        """``f_b_proj(f_a_proj(x))`` as ``[B, T, H, K]`` (``[B, T, H]`` for "gdn"): the gate before A_log/dt_bias."""
        g = self.f_b_proj(self.f_a_proj(x))
        return g if self.variant == "gdn" else g.unflatten(-1, (self.num_heads, self.head_k_dim))

    def compute_gate(self, x: torch.Tensor) -> torch.Tensor:
        """The fp32 log-decay ``[B, T, H, K]`` (GDN: one value per head, broadcast over K)."""
        raw = self.gate_raw(x)
        g = kda_gate_ref(raw.unsqueeze(-1) if self.variant == "gdn" else raw, self.A_log,
                         self.dt_bias.view(self.num_heads, -1))
        return g.expand(*g.shape[:-1], self.head_k_dim) if self.variant == "gdn" else g

    def beta_logits(self, x: torch.Tensor) -> torch.Tensor:
        """``b_proj(x)`` ``[B, T, H]``; beta is its sigmoid."""
        return self.b_proj(x)

    def _attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        *,
        initial_state: torch.Tensor | None = None,
        output_final_state: bool = False,
        cu_seqlens: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Gates from ``x``, then the operator. ``q, k`` raw (not yet L2-normalised). Returns ``(o, state)``."""
        kw = dict(initial_state=initial_state, output_final_state=output_final_state, cu_seqlens=cu_seqlens)
        backend = resolve_backend(self.backend, q.device)
        if self.variant == "decay":
            g, beta = self._masked_gates(x, mask)
            return chunk_decay(l2norm(q), l2norm(k), v, g, beta, **kw)
        if backend == "triton":
            return self._attend_fused(q, k, v, x, mask, **kw)
        g, beta = self._masked_gates(x, mask)
        return chunk_kda(l2norm(q), l2norm(k), v, g, beta, backend="reference", **kw)

    def _masked_gates(self, x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        g = self.compute_gate(x)
        logits = self.beta_logits(x)
        beta = torch.sigmoid(logits if logits.dtype == torch.float64 else logits.float())
        if mask is not None:  # pads neither decay nor write the state
            g = g * mask[:, :, None, None]
            beta = beta * mask[:, :, None]
        return g, beta

    def _attend_fused(self, q, k, v, x, mask, **kw):
        """Triton path: hand raw q/k (and, without padding, the raw gate and beta logits) to the kernel."""
        if mask is None and self.variant == "kda":
            fusion = KDAFusion(qk_l2norm=True, beta_sigmoid=True, A_log=self.A_log, dt_bias=self.dt_bias)
            return chunk_kda(q, k, v, self.gate_raw(x), self.beta_logits(x), fusion=fusion, backend="triton", **kw)
        g, beta = self._masked_gates(x, mask)
        return chunk_kda(q, k, v, g, beta.to(v.dtype), fusion=KDAFusion(qk_l2norm=True), backend="triton", **kw)

    def project_output(self, o: torch.Tensor, x: torch.Tensor, gate: torch.Tensor | None = None,
                       residual: torch.Tensor | None = None) -> torch.Tensor:
        """``o [B, T, H, V]`` -> gated per-head RMSNorm -> ``o_proj`` -> ``[B, T, D]``; ``gate`` is the
        output gate's logits ``g_b_proj(g_a_proj(x))`` ``[B, T, H * V]`` when the caller already has them;
        ``residual [B, T, D]`` is added (at decode in the projection's epilogue)."""
        if gate is None:
            gate = few_rows_linear(self.g_a_proj(x), self.g_b_proj.weight, backend=self.backend)
        gate = gate.unflatten(-1, (self.num_heads, self.head_v_dim))
        y = gated_rms_norm(o, gate, self.o_norm.weight, self.eps, backend=self.backend)
        return few_rows_linear(y.flatten(-2).to(x.dtype), self.o_proj.weight, residual=residual, backend=self.backend)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: Any = None,
        *,
        input_norm: tuple[torch.Tensor, float] | None = None,
        residual: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """``hidden_states [B, T, D]`` -> ``[B, T, D]``. ``kwargs`` may carry ``cu_seqlens`` (B == 1 packs).

        ``input_norm = (weight [D], eps)``: ``hidden_states`` is not yet normalised (the block's input
        norm); ``residual [B, T, D]``: returns ``residual + output``. The decode step folds both into
        its projections (docs/decode.md); every other path applies them apart."""
        if cache is not None:
            return self._forward_cached(hidden_states, cache, input_norm, residual)
        if hidden_states.dim() != 3:
            raise ValueError(f"hidden_states must be [B, T, D], got shape {tuple(hidden_states.shape)}")
        B, T, _ = hidden_states.shape
        hidden_states = apply_input_norm(hidden_states, input_norm, self.backend)
        mask = bool_mask(attention_mask, B, T)
        x = hidden_states if mask is None else hidden_states * mask[..., None].to(hidden_states.dtype)
        cu_seqlens = kwargs.get("cu_seqlens")
        q, k, v, _ = self.project_qkv(x, cu_seqlens=cu_seqlens)
        o, _ = self._attend(q, k, v, x, mask, cu_seqlens=cu_seqlens)
        return add_residual(self.project_output(o, x), residual)

    def _forward_cached(self, hidden_states: torch.Tensor, cache: Any,
                        input_norm: tuple[torch.Tensor, float] | None = None,
                        residual: torch.Tensor | None = None) -> torch.Tensor:
        """Prefill / decode against a :class:`kimi_linear.generation.cache.HybridCache` (its open step).

        Decode (one token, no padding): conv window step + the recurrent kernel, state updated in
        place in the cache. Otherwise (prefill, or a later piece of a prompt): the chunked operator
        starts from the cached state and conv windows and hands its final ones back, so a prompt fed
        in pieces gives the same result as one prefill. Padding comes from ``cache.step``.
        ``input_norm`` and ``residual`` as in :meth:`forward`: the decode step's input launch applies
        the norm and its output projection adds the residual.
        """
        step = cache.step
        if step is None:
            raise RuntimeError("a cached forward needs an open cache step (HybridCache.begin_step)")
        B, T, _ = hidden_states.shape
        cache.check_batch(B, "hidden_states")
        lc = cache.layers[self.layer_idx]
        mask = step.token_mask
        x = hidden_states if mask is None else hidden_states * mask[..., None].to(hidden_states.dtype)
        if step.decode and self.variant == "kda":
            H, K, V = self.num_heads, self.head_k_dim, self.head_v_dim
            # every projection of x in one launch (six matrix-vector products, five of them small), q, k
            # and v through their short-conv step + SiLU in the same programs (windows shift in place)
            # (x un-normalised with an input_norm: the launch folds the block's norm in)
            projs = (self.q_proj, self.k_proj, self.v_proj, self.f_a_proj, self.g_a_proj, self.b_proj)
            convs = [(window, conv.weight.view(conv.weight.shape[0], -1)) for conv, window in
                     ((self.q_conv1d, lc.conv_q), (self.k_conv1d, lc.conv_k), (self.v_conv1d, lc.conv_v))]
            nw, eps = input_norm if input_norm is not None else (None, 0.0)
            q, k, v, f_a, g_a, b = fused_linear(x.reshape(B, -1), [p.weight for p in projs],
                                                conv_steps=[*convs, None, None, None], norm_weight=nw, eps=eps,
                                                backend=self.backend)
            q, k, v = q.view(B, 1, H, K), k.view(B, 1, H, K), v.view(B, 1, H, V)
            if PREFETCH_OUTPUT_PROJECTION:  # into L2 beside the short launches below (ops/prefetch.py; forked
                # before this projection instead it was evicted by its weight stream: +124 us per step)
                prefetch_l2_(self.o_proj.weight)
            # both low-rank up-projections (the gate's and the output gate's; both K wide, V = K) in one
            # more launch, each reading its own slice of the launch above
            g_raw, gate = fused_linear([f_a, g_a], [self.f_b_proj.weight, self.g_b_proj.weight], backend=self.backend)
            fusion = KDAFusion(qk_l2norm=True, beta_sigmoid=True, A_log=self.A_log, dt_bias=self.dt_bias)
            o, _ = recurrent_kda(q, k, v, g_raw.view(B, 1, H, K), b.view(B, 1, H), initial_state=lc.state,
                                 state_indices=cache.slot_index, fusion=fusion, backend=self.backend)
            return self.project_output(o, x, gate=gate.view(B, 1, -1), residual=residual)
        x = apply_input_norm(x, input_norm, self.backend)  # (pads stay zero: the norm of zeros is zero)
        q, k, v, windows = self.project_qkv(x, conv_windows=lc.convs, output_conv_windows=True)
        for dst, w in zip(lc.convs, windows):
            dst.copy_(w)
        o, state = self._attend(q, k, v, x, mask, initial_state=lc.state, output_final_state=True)
        lc.state.copy_(state)
        return add_residual(self.project_output(o, x), residual)


class _HeadNorm(nn.Module):
    """Holds ``o_norm.weight [V]``; the gated norm itself is :func:`kimi_linear.ops.norm.gated_rms_norm`."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

