"""``recurrent_kda``: token-by-token KDA for decoding and short inputs, with an in-place state pool.

Dispatches to the fused Triton kernel (:mod:`.recurrent_kernel`) on CUDA and to
:func:`recurrent_kda_ref` elsewhere; ``backend`` forces a choice. Both paths share one signature and
one validation, so tests swap them freely.

Continuous batching: pass ``state_indices`` (int ``[N]``) and the whole state pool as
``initial_state`` (``[P, HV, K, V]`` fp32). Sequence ``n`` starts from ``pool[state_indices[n]]`` and
its final state is written back to that slot **in place**; slots nobody names are not touched. A
negative index marks a padding row: its state is neither read nor written and its outputs are zero.
"""

from __future__ import annotations

import torch

from kimi_linear.backends import resolve_backend
from kimi_linear.ops.kda.contract import check_kda_inputs, resolve_scale
from kimi_linear.ops.kda.fusion import KDAFusion
from kimi_linear.ops.kda.reference import recurrent_kda_ref

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_state_pool(pool: torch.Tensor, state_indices: torch.Tensor, *, N: int, HV: int, K: int, V: int,
                     device: torch.device, check_values: bool = True) -> None:
    """Validate a state pool ``[P, HV, K, V]`` fp32 and its slot indices ``[N]``.

    ``check_values`` also checks the index values (range, no slot named twice); that reads the
    indices on the host, a device sync when they live on the GPU.

    Raises:
        TypeError: non-tensor, non-integer indices, non-fp32 pool.
        ValueError: shapes, devices, out-of-range or duplicate slots.
    """
    if not isinstance(pool, torch.Tensor):
        raise TypeError(f"with state_indices, initial_state must be the state pool tensor [P, HV, K, V], got {type(pool).__name__}")
    if not isinstance(state_indices, torch.Tensor):
        raise TypeError(f"state_indices must be an integer tensor [N], got {type(state_indices).__name__}")
    if state_indices.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"state_indices must be int32 or int64, got {state_indices.dtype}")
    if state_indices.dim() != 1 or state_indices.numel() != N:
        raise ValueError(f"state_indices must be [N] = [{N}] (one slot per sequence), got shape {tuple(state_indices.shape)}")
    if pool.dim() != 4 or tuple(pool.shape[1:]) != (HV, K, V) or pool.shape[0] < 1:
        raise ValueError(f"state pool must be [P, HV, K, V] = [P>=1, {HV}, {K}, {V}], got shape {tuple(pool.shape)}")
    if pool.dtype != torch.float32:
        raise TypeError(f"state pool must be float32, got {pool.dtype}")
    if pool.device != device:
        raise ValueError(f"state pool is on {pool.device} but q is on {device}")
    if not pool.is_contiguous():
        raise ValueError("state pool must be contiguous (it is updated in place)")
    if state_indices.device != device and state_indices.device.type != "cpu":
        raise ValueError(f"state_indices is on {state_indices.device} but q is on {device}")
    if check_values and N > 0:
        idx = state_indices.tolist()
        P = pool.shape[0]
        bad = [i for i in idx if i >= P]
        if bad:
            raise ValueError(f"state_indices must be < pool size P={P} (negative = padding), got {bad[:8]}")
        live = [i for i in idx if i >= 0]
        if len(set(live)) != len(live):
            dup = sorted({i for i in live if live.count(i) > 1})
            raise ValueError(f"state_indices names slots {dup[:8]} more than once; each sequence needs its own slot")


def _reference_with_pool(q, k, v, g, beta, *, scale, pool, state_indices, output_final_state, cu_seqlens, fusion):
    """Reference semantics of the pool: gather the live slots, run the reference, scatter back."""
    idx = state_indices.to(device=pool.device, dtype=torch.long)
    live = idx >= 0
    gathered = torch.zeros((idx.numel(),) + tuple(pool.shape[1:]), dtype=pool.dtype, device=pool.device)
    gathered[live] = pool[idx[live]]
    o, final = recurrent_kda_ref(q, k, v, g, beta, scale=scale, initial_state=gathered, output_final_state=True,
                                 cu_seqlens=cu_seqlens, fusion=fusion)
    pool[idx[live]] = final[live].to(pool.dtype)
    # Padding rows produce zeros, as in the kernel.
    if not bool(live.all()):
        if cu_seqlens is None:
            o = o * live.to(o.dtype).view(-1, 1, 1, 1)
        else:
            lengths = cu_seqlens.to(device=o.device, dtype=torch.long).diff()
            token_live = torch.repeat_interleave(live, lengths)
            o = o * token_live.to(o.dtype).view(1, -1, 1, 1)
    return o, (pool if output_final_state else None)


def recurrent_kda(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    fusion: KDAFusion | None = None,
    state_indices: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Recurrent (token-by-token) KDA, forward only.

    | arg            | shape                 | notes                                                |
    |----------------|-----------------------|------------------------------------------------------|
    | q, k           | ``[B, T, H, K]``      | raw when ``fusion.qk_l2norm``                        |
    | v              | ``[B, T, HV, V]``     | HV % H == 0                                          |
    | g              | ``[B, T, HV, K]``     | log-decay <= 0, or raw projection with fused gate    |
    | beta           | ``[B, T, HV]``        | logits when ``fusion.beta_sigmoid``                  |
    | initial_state  | ``[N, HV, K, V]`` fp32| or the pool ``[P, HV, K, V]`` with ``state_indices`` |
    | state_indices  | ``[N]`` int           | slot of each sequence in the pool; < 0 = padding     |
    | cu_seqlens     | ``[N+1]`` int         | varlen pack, B == 1                                  |
    | o (returned)   | ``[B, T, HV, V]``     | dtype of v                                           |
    | final state    | ``[N, HV, K, V]`` fp32| the pool itself (updated in place) with indices      |

    Without ``state_indices``: ``initial_state`` is read only and the final state is a new tensor
    (None unless ``output_final_state``). With ``state_indices``: the pool is updated in place
    whatever ``output_final_state`` says (the flag only decides whether it is returned). Index
    values are checked on the host (range, duplicates) when the indices live on the CPU or the
    reference runs; indices already on the GPU are not read back (no sync in the decode loop) and
    the kernel then treats an out-of-range slot as padding.

    ``backend``: "auto" (Triton on CUDA for fp16/bf16/fp32, reference elsewhere), "triton", "reference".
    """
    shape = check_kda_inputs(q, k, v, g, beta, initial_state=None, cu_seqlens=cu_seqlens,
                             gate_is_log_decay=fusion is None or not fusion.gate_from_raw, check_values=False)
    if fusion is not None and not isinstance(fusion, KDAFusion):
        raise TypeError(f"fusion must be a KDAFusion or None, got {type(fusion).__name__}")
    if state_indices is not None:
        if initial_state is None:
            raise ValueError("state_indices needs the state pool [P, HV, K, V] passed as initial_state")
        check_state_pool(initial_state, state_indices, N=shape.N, HV=shape.HV, K=shape.K, V=shape.V,
                         device=q.device, check_values=state_indices.device.type == "cpu" or backend == "reference"
                         or q.device.type == "cpu")
    elif initial_state is not None:
        # Same check as the reference applies (shape [N, HV, K, V], fp32/fp64, device).
        check_kda_inputs(q, k, v, g, beta, initial_state=initial_state, cu_seqlens=cu_seqlens, check_values=False)

    chosen = resolve_backend(backend, q.device)
    if backend == "auto" and chosen == "triton" and v.dtype not in _KERNEL_DTYPES:
        chosen = "reference"  # fp64 runs only in the reference
    if chosen == "reference":
        if state_indices is not None:
            return _reference_with_pool(q, k, v, g, beta, scale=scale, pool=initial_state,
                                        state_indices=state_indices, output_final_state=output_final_state,
                                        cu_seqlens=cu_seqlens, fusion=fusion)
        return recurrent_kda_ref(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                                 output_final_state=output_final_state, cu_seqlens=cu_seqlens, fusion=fusion)
    return _recurrent_triton(q, k, v, g, beta, shape=shape, scale=resolve_scale(scale, shape.K),
                             initial_state=initial_state, output_final_state=output_final_state,
                             cu_seqlens=cu_seqlens, fusion=fusion, state_indices=state_indices)


def _recurrent_triton(q, k, v, g, beta, *, shape, scale, initial_state, output_final_state, cu_seqlens, fusion,
                      state_indices, **tile):
    from kimi_linear.ops.kda.recurrent_kernel import recurrent_kda_fwd

    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dtype not in _KERNEL_DTYPES:
            raise TypeError(f"the Triton recurrent_kda takes fp16/bf16/fp32 {name}, got {t.dtype} (use backend='reference')")
    if initial_state is not None and initial_state.dtype != torch.float32:
        raise TypeError(f"the Triton recurrent_kda keeps states in float32, got initial_state {initial_state.dtype}")
    A_log = dt_bias = None
    qk_l2norm = beta_sigmoid = False
    if fusion is not None:
        qk_l2norm, beta_sigmoid = fusion.qk_l2norm, fusion.beta_sigmoid
        if fusion.gate_from_raw:
            if fusion.A_log.numel() != shape.HV or fusion.dt_bias.numel() != shape.HV * shape.K:
                raise ValueError(
                    f"fused gate needs A_log with HV={shape.HV} values and dt_bias with HV*K={shape.HV * shape.K}, "
                    f"got {tuple(fusion.A_log.shape)} and {tuple(fusion.dt_bias.shape)}"
                )
            A_log = fusion.A_log.reshape(-1).to(device=q.device, dtype=torch.float32).contiguous()
            dt_bias = fusion.dt_bias.reshape(-1).to(device=q.device, dtype=torch.float32).contiguous()
    if state_indices is not None:
        h0 = ht = initial_state
        idx = state_indices.to(device=q.device, non_blocking=True).contiguous()
    else:
        h0 = initial_state.contiguous() if initial_state is not None else None
        ht = (torch.empty((shape.N, shape.HV, shape.K, shape.V), dtype=torch.float32, device=q.device)
              if output_final_state else None)
        idx = None
    cu = cu_seqlens.to(device=q.device).contiguous() if cu_seqlens is not None else None
    o = recurrent_kda_fwd(
        q.contiguous(), k.contiguous(), v.contiguous(), g.contiguous(), beta.contiguous(),
        scale=scale, h0=h0, ht=ht, cu_seqlens=cu, state_indices=idx, N=shape.N,
        A_log=A_log, dt_bias=dt_bias, qk_l2norm=qk_l2norm, beta_sigmoid=beta_sigmoid, **tile,
    )
    if state_indices is not None:
        return o, (initial_state if output_final_state else None)
    return o, ht
