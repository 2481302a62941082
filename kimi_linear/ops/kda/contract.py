"""Input validation shared by every KDA operator (references and kernels alike).

One place checks the contract of ``docs/kda.md`` so that a reference and its kernel reject
exactly the same inputs with the same messages.

Shape letters: B batch, T time, H q/k heads, HV value heads (HV % H == 0), K key dim,
V value dim, N sequences (N = B, or len(cu_seqlens) - 1 for a varlen pack).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class KDAShape:
    """Sizes of one KDA call, read off validated inputs."""

    B: int
    T: int
    H: int
    HV: int
    K: int
    V: int
    N: int


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def _require_tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (fp16/bf16/fp32/fp64), got {_describe(t)}")
    return t


def check_cu_seqlens(cu_seqlens: torch.Tensor, B: int, T: int) -> int:
    """Validate a varlen offsets tensor ``[N+1]`` for a pack of ``T`` tokens; return N.

    Empty sequences (equal neighbours) are allowed; decreasing offsets are not.
    """
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be an integer torch.Tensor [N+1], got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D with at least 2 entries [N+1], got shape {tuple(cu_seqlens.shape)}")
    if B != 1:
        raise ValueError(f"with cu_seqlens the batch must be 1 (sequences packed along T), got B={B}")
    offsets = cu_seqlens.tolist()
    if offsets[0] != 0 or offsets[-1] != T:
        raise ValueError(f"cu_seqlens must start at 0 and end at T={T}, got first={offsets[0]}, last={offsets[-1]}")
    for i in range(len(offsets) - 1):
        if offsets[i + 1] < offsets[i]:
            raise ValueError(
                f"cu_seqlens must be non-decreasing, got cu_seqlens[{i}]={offsets[i]} > cu_seqlens[{i + 1}]={offsets[i + 1]}"
            )
    return len(offsets) - 1


def check_kda_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor | None,
    *,
    initial_state: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    gate_per_head: bool = False,
    gate_is_log_decay: bool = True,
    check_values: bool = True,
) -> KDAShape:
    """Check the KDA operator contract and return its sizes.

    Args:
        q, k: ``[B, T, H, K]``.  v: ``[B, T, HV, V]``.
        g: ``[B, T, HV, K]`` (``[B, T, HV]`` when ``gate_per_head``).
        beta: ``[B, T, HV]`` or None (only for the decay-only family).
        initial_state: ``[N, HV, K, V]``.
        cu_seqlens: int ``[N+1]``, B must be 1.
        gate_is_log_decay: g is a log-decay, so it must be <= 0 and not NaN (False when g is a raw
            projection that the operator turns into a gate itself).
        check_values: also check gate values (costs a device sync; references keep it on).

    Raises:
        TypeError: a non-tensor or non-floating input.
        ValueError: shapes, devices, offsets or gate values off the contract; the message names
            the expected and the received values.
    """
    for name, t in (("q", q), ("k", k), ("v", v), ("g", g)):
        _require_tensor(name, t)
    if beta is not None:
        _require_tensor("beta", beta)
    if q.dim() != 4:
        raise ValueError(f"q must be [B, T, H, K], got {_describe(q)}")
    if k.shape != q.shape:
        raise ValueError(f"k must have q's shape {tuple(q.shape)} [B, T, H, K], got {tuple(k.shape)}")
    B, T, H, K = q.shape
    if v.dim() != 4 or v.shape[:2] != (B, T):
        raise ValueError(f"v must be [B={B}, T={T}, HV, V], got {_describe(v)}")
    HV, V = v.shape[2], v.shape[3]
    if H == 0 or HV % H != 0:
        raise ValueError(f"value heads HV={HV} must be a positive multiple of q/k heads H={H}")
    g_shape = (B, T, HV) if gate_per_head else (B, T, HV, K)
    if tuple(g.shape) != g_shape:
        want = "[B, T, HV]" if gate_per_head else "[B, T, HV, K]"
        raise ValueError(f"g must be {want} = {g_shape}, got {tuple(g.shape)}")
    if beta is not None and tuple(beta.shape) != (B, T, HV):
        raise ValueError(f"beta must be [B, T, HV] = {(B, T, HV)}, got {tuple(beta.shape)}")
    tensors = [("q", q), ("k", k), ("v", v), ("g", g)] + ([("beta", beta)] if beta is not None else [])
    for name, t in tensors[1:]:
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}; all inputs must share a device")
    N = B
    if cu_seqlens is not None:
        if cu_seqlens.device != q.device and q.device.type != "cpu":
            raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but q is on {q.device}")
        N = check_cu_seqlens(cu_seqlens, B, T)
    if initial_state is not None:
        if not isinstance(initial_state, torch.Tensor):
            raise TypeError(f"initial_state must be a tensor [N, HV, K, V], got {type(initial_state).__name__}")
        if tuple(initial_state.shape) != (N, HV, K, V):
            raise ValueError(f"initial_state must be [N, HV, K, V] = {(N, HV, K, V)}, got {tuple(initial_state.shape)}")
        if initial_state.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"initial_state must be float32 (float64 for fp64 inputs), got {initial_state.dtype}")
        if initial_state.device != q.device:
            raise ValueError(f"initial_state is on {initial_state.device} but q is on {q.device}")
    if check_values and gate_is_log_decay and g.numel() > 0:
        if torch.isnan(g).any():
            raise ValueError("g contains NaN; a log-decay gate must be a number <= 0")
        g_max = g.max().item()
        if g_max > 0:
            raise ValueError(f"g is a log-decay and must be <= 0 everywhere, got max(g)={g_max:.4g}")
    return KDAShape(B=B, T=T, H=H, HV=HV, K=K, V=V, N=N)


def resolve_scale(scale: float | None, K: int) -> float:
    """The output scale: ``K ** -0.5`` unless given."""
    if scale is None:
        return K**-0.5
    if not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    return float(scale)


def sequence_spans(shape: KDAShape, cu_seqlens: torch.Tensor | None) -> list[tuple[int, int, int]]:
    """``(batch row, start, end)`` of each of the N sequences, in state order."""
    if cu_seqlens is None:
        return [(b, 0, shape.T) for b in range(shape.B)]
    offsets = cu_seqlens.tolist()
    return [(0, offsets[n], offsets[n + 1]) for n in range(len(offsets) - 1)]
