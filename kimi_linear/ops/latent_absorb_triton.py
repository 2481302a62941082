"""Triton kernels for the two absorbed projections around the latent attention at decode (a few tokens).

``kv_b_proj.weight [H * (Dn + Dv), R]`` holds per head ``W_uk [Dn, R]`` (rows ``h (Dn + Dv) ..``) and
``W_uv [Dv, R]`` (the next ``Dv`` rows). Decoding needs

    q_lat[n, h, :] = q_nope[n, h, :] @ W_uk[h]          [N, H, R]   (query side, before attention)
    out[n, h, :]   = W_uv[h] @ ctx[n, h, :]             [N, H, Dv]  (output side, after the merge)

for N tokens (one per sequence at decode). cuBLAS did each as a batched matmul (~4.2-4.6 us per call
on an H100 for 4.2 MB of weights); these kernels read each weight tile once for all N tokens (a loop
over tokens inside the program, fp32 sums, the result rounded once to the output dtype as the matmul's
is) and, unlike cuBLAS, take programmatic dependent launch (ops/pdl.py), so the kernels around them
may start early too.

Grids: query side ``(H, cdiv(R, BR))``, each program one ``[Dn, BR]`` tile of ``W_uk[h]``; output side
``(H, cdiv(Dv, BV))``, each program one ``[BV, R]`` tile of ``W_uv[h]``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kimi_linear.ops.pdl import pdl_launch
from kimi_linear.ops.pdl_kernel import wait_for_previous_grid

# The most tokens the kernels take (the loop over tokens is serial in each program; more tokens, as at
# a large decode batch, go to cuBLAS)
MAX_TOKENS = 8
# Launch settings (H100, bf16, 32 heads, Dn = Dv = 128, R = 512): tiles of 16 KB, 256 programs per call.
# Session 26, in the model's graph-replayed step (results/decode/session26/absorb_tiles_h100.txt; ms at 64K /
# 4K against these): BR 32 or 128 and BV 8 within 3 us (noise), BV 32 +28 / +20 us, 8 warps +20 / +27, 2 warps
# +6 / +5: kept
TILES = dict(BR=64, BV=16, num_warps=4)


@triton.jit
def _absorb_query_kernel(q_ptr, w_ptr, out_ptr, N, s_qn, s_qh,
                         H: tl.constexpr, DN: tl.constexpr, DV: tl.constexpr, R: tl.constexpr,
                         BD: tl.constexpr, BR: tl.constexpr, PDL: tl.constexpr, TRIGGER: tl.constexpr = True):
    # out [N, H, R] (contiguous) = q [N, H, DN] (rows s_qn, heads s_qh apart) times W_uk[h] per head
    wait_for_previous_grid(PDL, TRIGGER)
    i_h = tl.program_id(0)
    o_d = tl.arange(0, BD)
    o_r = tl.program_id(1) * BR + tl.arange(0, BR)
    m_d, m_r = o_d < DN, o_r < R
    b_w = tl.load(w_ptr + (i_h * (DN + DV) + o_d[:, None]).to(tl.int64) * R + o_r[None, :],
                  mask=m_d[:, None] & m_r[None, :], other=0.0).to(tl.float32)
    for n in range(0, N):
        b_q = tl.load(q_ptr + n * s_qn + i_h * s_qh + o_d, mask=m_d, other=0.0).to(tl.float32)
        acc = tl.sum(b_w * b_q[:, None], axis=0)
        tl.store(out_ptr + (n * H + i_h) * R + o_r, acc.to(out_ptr.dtype.element_ty), mask=m_r)


@triton.jit
def _absorb_output_kernel(c_ptr, w_ptr, out_ptr, N,
                          H: tl.constexpr, DN: tl.constexpr, DV: tl.constexpr, R: tl.constexpr,
                          RP: tl.constexpr, BV: tl.constexpr, PDL: tl.constexpr, TRIGGER: tl.constexpr = True):
    # out [N, H, DV] (contiguous) = W_uv[h] times ctx [N, H, R] (contiguous) per head
    wait_for_previous_grid(PDL, TRIGGER)
    i_h = tl.program_id(0)
    o_v = tl.program_id(1) * BV + tl.arange(0, BV)
    o_r = tl.arange(0, RP)
    m_v, m_r = o_v < DV, o_r < R
    b_w = tl.load(w_ptr + (i_h * (DN + DV) + DN + o_v[:, None]).to(tl.int64) * R + o_r[None, :],
                  mask=m_v[:, None] & m_r[None, :], other=0.0).to(tl.float32)
    for n in range(0, N):
        b_c = tl.load(c_ptr + (n * H + i_h) * R + o_r, mask=m_r, other=0.0).to(tl.float32)
        acc = tl.sum(b_w * b_c[None, :], axis=1)
        tl.store(out_ptr + (n * H + i_h) * DV + o_v, acc.to(out_ptr.dtype.element_ty), mask=m_v)


def _check(name: str, x: torch.Tensor, w_kv_b: torch.Tensor, inner: int) -> None:
    """``x [N, H, inner]`` and ``w_kv_b [H * (Dn + Dv), R]`` (contiguous, same device) or a ValueError."""
    if x.dim() != 3:
        raise ValueError(f"{name} must be [N, H, {inner if inner else 'Dn'}], got shape {tuple(x.shape)}")
    H = x.shape[1]
    if w_kv_b.dim() != 2 or not w_kv_b.is_contiguous() or H < 1 or w_kv_b.shape[0] % H:
        raise ValueError(f"w_kv_b must be a contiguous [H * (Dn + Dv), R] with H={H} heads, got shape "
                         f"{tuple(w_kv_b.shape)} (contiguous={w_kv_b.is_contiguous()})")
    if inner and x.shape[2] != inner:
        raise ValueError(f"{name} must be [N, H, R] with R={inner} (w_kv_b's width), got shape {tuple(x.shape)}")
    if x.device != w_kv_b.device:
        raise ValueError(f"{name} is on {x.device} but w_kv_b is on {w_kv_b.device}")


def absorb_query(q_nope: torch.Tensor, w_kv_b: torch.Tensor, out_dtype: torch.dtype,
                 before_keys_major: bool = False) -> torch.Tensor:
    """``q_nope [N, H, Dn]`` (any row / head strides, unit last stride), ``w_kv_b [H * (Dn + Dv), R]``
    contiguous -> ``q_lat [N, H, R]`` in ``out_dtype``. ``before_keys_major``: the keys-major split kernel
    comes next, which has its own PDL trigger entry (ops/pdl.py)."""
    _check("q_nope", q_nope, w_kv_b, 0)
    if w_kv_b.shape[0] // q_nope.shape[1] <= q_nope.shape[2]:
        raise ValueError(f"w_kv_b has {w_kv_b.shape[0] // q_nope.shape[1]} rows per head, fewer than "
                         f"q_nope's Dn={q_nope.shape[2]} plus a value part")
    N, H, Dn = q_nope.shape
    R = w_kv_b.shape[1]
    Dv = w_kv_b.shape[0] // H - Dn
    if q_nope.stride(-1) != 1:
        q_nope = q_nope.contiguous()
    out = torch.empty(N, H, R, device=q_nope.device, dtype=out_dtype)
    br = min(TILES["BR"], triton.next_power_of_2(R))
    _absorb_query_kernel[(H, triton.cdiv(R, br))](
        q_nope, w_kv_b, out, N, q_nope.stride(0), q_nope.stride(1),
        H=H, DN=Dn, DV=Dv, R=R, BD=triton.next_power_of_2(Dn), BR=br,
        num_warps=TILES["num_warps"],
        **pdl_launch(q_nope.device, "absorb_query_keys_major" if before_keys_major else "absorb_query"))
    return out


def absorb_output(ctx: torch.Tensor, w_kv_b: torch.Tensor, Dn: int, out_dtype: torch.dtype) -> torch.Tensor:
    """``ctx [N, H, R]`` contiguous, ``w_kv_b [H * (Dn + Dv), R]`` contiguous -> ``[N, H, Dv]`` in
    ``out_dtype``."""
    _check("ctx", ctx, w_kv_b, w_kv_b.shape[1] if w_kv_b.dim() == 2 else -1)
    N, H, R = ctx.shape
    Dv = w_kv_b.shape[0] // H - Dn
    if Dn < 1 or Dv < 1:
        raise ValueError(f"Dn={Dn} leaves no value rows in w_kv_b's {w_kv_b.shape[0] // H} rows per head")
    out = torch.empty(N, H, Dv, device=ctx.device, dtype=out_dtype)
    bv = min(TILES["BV"], triton.next_power_of_2(Dv))
    _absorb_output_kernel[(H, triton.cdiv(Dv, bv))](
        ctx.contiguous(), w_kv_b, out, N,
        H=H, DN=Dn, DV=Dv, R=R, RP=triton.next_power_of_2(R), BV=bv,
        num_warps=TILES["num_warps"], **pdl_launch(ctx.device, "absorb_output"))
    return out
