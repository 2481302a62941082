"""``kda_decode_step``: a KDA layer's decode step from its input projections to the output
projection's input, one token per sequence, with the in-place state pool of :func:`recurrent_kda`.

    g   = -exp(A_log) * softplus(f_b(f_a) + dt_bias)          per value head, [HV, K]
    o   = recurrent_kda(q, k, v, g, beta) for one token     (L2-normalised q/k, sigmoid beta)
    y   = RMSNorm(o) * norm_weight * sigmoid(g_b(g_a))       per value head over V

| arg                 | shape              | notes                                                   |
|---------------------|--------------------|---------------------------------------------------------|
| q, k                | ``[N, H*K]``       | raw projections (after the conv step); unit column stride |
| v                   | ``[N, HV*V]``      |                                                         |
| gate_a, out_gate_a  | ``[N, RF]``, ``[N, RG]`` | the low-rank ``f_a`` / ``g_a`` projections         |
| beta                | ``[N, HV]``        | logits                                                  |
| gate_b_weight       | ``[HV*K, RF]``     | ``f_b_proj.weight``                                     |
| out_gate_b_weight   | ``[HV*V, RG]``     | ``g_b_proj.weight``                                     |
| norm_weight         | ``[V]``            | the gated RMSNorm's weight; ``eps`` its epsilon          |
| A_log, dt_bias      | ``[HV]``, ``[HV*K]`` | the gate's parameters                                 |
| state_pool          | ``[P, HV, K, V]`` fp32 | updated in place at ``state_indices [N]`` (< 0: padding, output zero) |
| return              | ``[N, HV*V]``      | dtype of v                                              |

On CUDA (Triton) one launch does all three lines (:mod:`.decode_step_kernel`): it replaces the
unfused step's up-projection launch, the recurrent kernel and the gated norm. Elsewhere, and with
``backend="reference"``, the same lines run as the unfused ops (``F.linear`` with outputs in the
activations' dtype, :func:`recurrent_kda`'s reference, :func:`gated_rms_norm`): that composition is
the op's reference, and the kernel rounds the two up-projections and ``o`` to the activations' dtype
where the composition does, so the two agree to the last bits of fp32 sums.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kimi_linear.backends import resolve_backend
from kimi_linear.ops.kda.contract import resolve_scale
from kimi_linear.ops.kda.fusion import KDAFusion
from kimi_linear.ops.kda.recurrent import check_state_pool, recurrent_kda
from kimi_linear.ops.norm import gated_rms_norm

__all__ = ["kda_decode_step", "kda_decode_step_ref"]

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _shapes(q, k, v, gate_a, out_gate_a, beta, gate_b_weight, out_gate_b_weight, norm_weight, A_log, dt_bias,
            num_heads: int, head_k_dim: int) -> tuple[int, int, int, int, int]:
    """Validate shapes, dtypes and devices; returns ``(N, H, HV, K, V)``."""
    named = dict(q=q, k=k, v=v, gate_a=gate_a, out_gate_a=out_gate_a, beta=beta, gate_b_weight=gate_b_weight,
                 out_gate_b_weight=out_gate_b_weight, norm_weight=norm_weight, A_log=A_log, dt_bias=dt_bias)
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    for name in ("q", "k", "v", "gate_a", "out_gate_a", "beta"):
        if named[name].dim() != 2:
            raise ValueError(f"{name} must be [N, width] (one token per sequence), got shape {tuple(named[name].shape)}")
    N, H, K = q.shape[0], num_heads, head_k_dim
    if H < 1 or K < 1 or q.shape[1] != H * K:
        raise ValueError(f"q must be [N, num_heads * head_k_dim] = [N, {H} * {K}], got {tuple(q.shape)}")
    if tuple(k.shape) != tuple(q.shape):
        raise ValueError(f"k must have q's shape {tuple(q.shape)}, got {tuple(k.shape)}")
    HV = beta.shape[1]
    if HV < 1 or HV % H:
        raise ValueError(f"beta's width (value heads HV={HV}) must be a positive multiple of num_heads={H}")
    if v.shape[1] % HV:
        raise ValueError(f"v's width {v.shape[1]} is not a multiple of the value heads HV={HV}")
    V = v.shape[1] // HV
    for name in ("k", "v", "gate_a", "out_gate_a", "beta"):
        if named[name].shape[0] != N:
            raise ValueError(f"{name} has {named[name].shape[0]} rows, q has {N}")
    if tuple(gate_b_weight.shape) != (HV * K, gate_a.shape[1]):
        raise ValueError(f"gate_b_weight must be [HV*K, RF] = [{HV * K}, {gate_a.shape[1]}], got {tuple(gate_b_weight.shape)}")
    if tuple(out_gate_b_weight.shape) != (HV * V, out_gate_a.shape[1]):
        raise ValueError(f"out_gate_b_weight must be [HV*V, RG] = [{HV * V}, {out_gate_a.shape[1]}], "
                         f"got {tuple(out_gate_b_weight.shape)}")
    if tuple(norm_weight.shape) != (V,):
        raise ValueError(f"norm_weight must be [V] = [{V}], got {tuple(norm_weight.shape)}")
    if A_log.numel() != HV or dt_bias.numel() != HV * K:
        raise ValueError(f"A_log needs HV={HV} values and dt_bias HV*K={HV * K}, got {tuple(A_log.shape)} and "
                         f"{tuple(dt_bias.shape)}")
    dtypes = {t.dtype for t in (q, k, v, gate_a, out_gate_a)}
    if len(dtypes) != 1 or not q.dtype.is_floating_point:
        raise TypeError(f"q, k, v, gate_a, out_gate_a must share one floating dtype, got {sorted(map(str, dtypes))}")
    return N, H, HV, K, V


def kda_decode_step_ref(q, k, v, gate_a, out_gate_a, beta, *, gate_b_weight, out_gate_b_weight, norm_weight,
                        eps, A_log, dt_bias, state_pool, state_indices, num_heads, head_k_dim, scale=None):
    """The unfused composition (module docstring); updates ``state_pool`` in place."""
    N, H, HV, K, V = _shapes(q, k, v, gate_a, out_gate_a, beta, gate_b_weight, out_gate_b_weight, norm_weight,
                             A_log, dt_bias, num_heads, head_k_dim)
    g_raw = F.linear(gate_a, gate_b_weight.to(gate_a.dtype))
    gate = F.linear(out_gate_a, out_gate_b_weight.to(out_gate_a.dtype))
    fusion = KDAFusion(qk_l2norm=True, beta_sigmoid=True, A_log=A_log, dt_bias=dt_bias)
    o, _ = recurrent_kda(q.reshape(N, 1, H, K), k.reshape(N, 1, H, K), v.reshape(N, 1, HV, V),
                         g_raw.reshape(N, 1, HV, K), beta.reshape(N, 1, HV), scale=scale, initial_state=state_pool,
                         state_indices=state_indices, fusion=fusion, backend="reference")
    y = gated_rms_norm(o, gate.reshape(N, 1, HV, V), norm_weight, eps, backend="reference")
    return y.reshape(N, HV * V)


def kda_decode_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gate_a: torch.Tensor,
                    out_gate_a: torch.Tensor, beta: torch.Tensor, *, gate_b_weight: torch.Tensor,
                    out_gate_b_weight: torch.Tensor, norm_weight: torch.Tensor, eps: float, A_log: torch.Tensor,
                    dt_bias: torch.Tensor, state_pool: torch.Tensor, state_indices: torch.Tensor, num_heads: int,
                    head_k_dim: int, scale: float | None = None, backend: str = "auto",
                    BV: int | None = None, num_warps: int | None = None) -> torch.Tensor:
    """One decode step of a KDA layer after its input projections (module docstring for shapes).

    ``backend``: "auto" (Triton on CUDA for fp16/bf16/fp32, the reference elsewhere), "triton",
    "reference". ``BV`` (state columns per program, a power of two) and ``num_warps`` override the
    kernel's launch setting (benchmark sweeps). No host sync
    on the Triton path when ``state_indices`` live on the GPU (their values are then not checked;
    an out-of-range slot is treated as padding), so the step can be graph-captured.

    Raises:
        TypeError / ValueError: shapes, dtypes, devices, the pool and its indices (see check_state_pool).
    """
    N, H, HV, K, V = _shapes(q, k, v, gate_a, out_gate_a, beta, gate_b_weight, out_gate_b_weight, norm_weight,
                             A_log, dt_bias, num_heads, head_k_dim)
    chosen = resolve_backend(backend, q.device)
    if backend == "auto" and chosen == "triton" and q.dtype not in _KERNEL_DTYPES:
        chosen = "reference"
    check_state_pool(state_pool, state_indices, N=N, HV=HV, K=K, V=V, device=q.device,
                     check_values=state_indices.device.type == "cpu" or chosen == "reference")
    if chosen == "reference":
        return kda_decode_step_ref(q, k, v, gate_a, out_gate_a, beta, gate_b_weight=gate_b_weight,
                                   out_gate_b_weight=out_gate_b_weight, norm_weight=norm_weight, eps=eps,
                                   A_log=A_log, dt_bias=dt_bias, state_pool=state_pool, state_indices=state_indices,
                                   num_heads=H, head_k_dim=K, scale=scale)
    if q.dtype not in _KERNEL_DTYPES:
        raise TypeError(f"the Triton kda_decode_step takes fp16/bf16/fp32 activations, got {q.dtype} "
                        "(use backend='reference')")
    from kimi_linear.ops.kda.decode_step_kernel import kda_decode_step_fwd

    def rows(t: torch.Tensor) -> torch.Tensor:  # row-strided views (slices of one projection buffer) pass as they are
        return t if t.stride(1) == 1 else t.contiguous()

    y = torch.empty((N, HV * V), dtype=v.dtype, device=q.device)
    if N == 0:
        return y
    kda_decode_step_fwd(rows(q), rows(k), rows(v), rows(gate_a), rows(out_gate_a), rows(beta), y, state_pool,
                        state_indices.to(device=q.device, non_blocking=True).contiguous(),
                        gate_b_weight.contiguous(), out_gate_b_weight.contiguous(), norm_weight.contiguous(),
                        A_log.reshape(-1).to(dtype=torch.float32).contiguous(),
                        dt_bias.reshape(-1).to(dtype=torch.float32).contiguous(),
                        N=N, H=H, HV=HV, K=K, V=V, scale=resolve_scale(scale, K), eps=float(eps),
                        BV=BV, num_warps=num_warps)
    return y
