"""Triton split-KV (flash-decoding) kernel for absorbed MLA attention over the latent cache.

Semantics and shapes: :mod:`kimi_linear.ops.latent_attention`. The query side is absorbed first
(``q_lat = W_uk^T q_nope``: :mod:`kimi_linear.ops.latent_absorb_triton` for a few tokens, a batched
matmul otherwise); the kernel then runs multi-query attention in which all
``M = T * H`` query rows of a sequence share one key/value stream, so each latent tile is read from
memory once and used twice (scores against ``[c, k_r]``, then the value sum over ``c``). The key axis
is split across programs so that a single long sequence still fills the GPU; each program leaves a
partial context and its log-sum-exp, and a second small Triton kernel merges the splits into the
context ``[B, M, R]`` (in ``W_uv``'s dtype). The output projection ``W_uv`` is applied afterwards (the same
two forms).

Split kernel grid: ``(G, S, B)``: ``G`` groups of ``BLOCK_M`` query rows (``G * BLOCK_M >= M``; the
groups of one split are neighbours in launch order, so a latent tile read by one is usually still in
L2 for the others), ``S`` splits of the key axis. Inside: ``BLOCK_N`` keys per iteration, latent width
``R`` and key part ``DR`` (powers of two).
Merge kernel grid: ``(B, M, R / BLOCK_R)``, one query row and ``BLOCK_R`` latent columns per program.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kimi_linear.ops import latent_absorb_triton as absorb
from kimi_linear.ops.latent_attention import _check, split_kv_b
from kimi_linear.ops.latent_prefetch_kernel import prefetch_split_tiles
from kimi_linear.ops.pdl import hopper_or_later, pdl_launch
from kimi_linear.ops.pdl_kernel import wait_for_previous_grid
from kimi_linear.ops.prefetch import prefetch_l2_


@triton.jit
def _split_program(len_ptr, M, T, H, keys_per_split, BLOCK_M: tl.constexpr):
    """A split program's ``(i_s, i_b, o_m, m_m, limit, start, end)``: its split and batch row, its query
    rows and their mask, each row's causal key limit, and its key range ``[start, end)``."""
    i_g = tl.program_id(0)
    i_s = tl.program_id(1).to(tl.int64)
    i_b = tl.program_id(2).to(tl.int64)
    o_m = i_g * BLOCK_M + tl.arange(0, BLOCK_M)
    length = tl.load(len_ptr + i_b).to(tl.int64)
    # query row m is token t = m // H of the T new tokens; it sees keys j < length - (T - 1 - t)
    limit = length - (T - 1) + (o_m // H)
    start = i_s * keys_per_split
    return i_s, i_b, o_m, o_m < M, limit, start, tl.minimum(start + keys_per_split, length)


@triton.jit
def _split_lse(m_i, l_i):
    """``(lse, divisor)`` of a split's softmax statistics: ``-inf`` and 1 for rows that saw no key."""
    return tl.where(l_i > 0, m_i + tl.log(tl.where(l_i > 0, l_i, 1.0)), float("-inf")), tl.where(l_i > 0, l_i, 1.0)


@triton.jit
def _latent_attn_split_kernel(
    q_lat_ptr, q_rope_ptr, c_ptr, kr_ptr, len_ptr, o_ptr, lse_ptr,
    L, M, T, H, keys_per_split, sm_scale,
    stride_qb, stride_qm, stride_qrb, stride_qrm,
    stride_cb, stride_cl, stride_krb, stride_krl,
    stride_ob, stride_os, stride_om, stride_lb, stride_ls,
    R: tl.constexpr, DR: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PDL: tl.constexpr,
    TRIGGER: tl.constexpr = True,
):
    wait_for_previous_grid(PDL, TRIGGER)  # programmatic dependent launch (ops/pdl.py)
    i_s, i_b, o_m, m_m, limit, start, end = _split_program(len_ptr, M, T, H, keys_per_split, BLOCK_M)
    o_r = tl.arange(0, R)
    o_d = tl.arange(0, DR)

    p_q = q_lat_ptr + i_b * stride_qb + o_m[:, None] * stride_qm + o_r[None, :]
    b_q = tl.load(p_q, mask=m_m[:, None], other=0.0)
    p_qr = q_rope_ptr + i_b * stride_qrb + o_m[:, None] * stride_qrm + o_d[None, :]
    b_qr = tl.load(p_qr, mask=m_m[:, None], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, R], dtype=tl.float32)
    for j0 in range(start, end, BLOCK_N):
        o_n = j0 + tl.arange(0, BLOCK_N)
        m_n = o_n < end
        b_c = tl.load(c_ptr + i_b * stride_cb + o_n[:, None] * stride_cl + o_r[None, :], mask=m_n[:, None], other=0.0)
        b_kr = tl.load(kr_ptr + i_b * stride_krb + o_n[:, None] * stride_krl + o_d[None, :], mask=m_n[:, None], other=0.0)
        b_s = tl.dot(b_q, tl.trans(b_c)) + tl.dot(b_qr, tl.trans(b_kr))
        b_s = b_s * sm_scale
        valid = (o_n[None, :] < limit[:, None]) & m_n[None, :]
        b_s = tl.where(valid, b_s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(b_s, 1))
        # rows that have seen no valid key yet keep m = -inf; shift by 0 there so no (-inf) - (-inf) forms
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        b_p = tl.exp(b_s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(b_p, 1)
        acc = acc * alpha[:, None] + tl.dot(b_p.to(b_c.dtype), b_c)
        m_i = m_new

    lse, den = _split_lse(m_i, l_i)
    out = acc / den[:, None]
    p_o = o_ptr + i_b * stride_ob + i_s * stride_os + o_m[:, None] * stride_om + o_r[None, :]
    tl.store(p_o, out, mask=m_m[:, None])
    tl.store(lse_ptr + i_b * stride_lb + i_s * stride_ls + o_m, lse, mask=m_m)


@triton.jit
def _latent_attn_split_keys_major_kernel(
    q_lat_ptr, q_rope_ptr, c_ptr, kr_ptr, len_ptr, o_ptr, lse_ptr,
    L, M, T, H, keys_per_split, sm_scale,
    stride_qb, stride_qm, stride_qrb, stride_qrm,
    stride_cb, stride_cl, stride_krb, stride_krl,
    stride_ob, stride_os, stride_om, stride_lb, stride_ls,
    R: tl.constexpr, DR: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PDL: tl.constexpr,
    TMA: tl.constexpr = False, TRIGGER: tl.constexpr = True, PREFETCH_TILES: tl.constexpr = 0,
    ELT: tl.constexpr = 2,
):
    # The split kernel's arithmetic with both products transposed: scores^T [BLOCK_N keys, BLOCK_M rows]
    # = [c, k_r] [q_lat, q_rope]^T and context^T [R, BLOCK_M] += c^T p^T. The key tile (BLOCK_N = 64) and
    # the latent width (R = 512) are then the products' M sides, which Hopper's asynchronous wgmma needs
    # in multiples of 64, where the query rows (32 heads at one token) were too few for it: one program
    # serves all 32 rows from one read of each tile (no second row group re-reading it).
    if PREFETCH_TILES > 0:
        # before the wait: the split's first tiles asked into L2 while the query absorption still runs
        # (TILES["prefetch_tiles"]). Safe: a prefetch has no destination, and the lengths it reads were
        # written by a kernel that completed before the one this launch waits for
        prefetch_split_tiles(c_ptr, kr_ptr, len_ptr, tl.program_id(1), tl.program_id(2), keys_per_split,
                             stride_cb, stride_krb, R, DR, BLOCK_N, PREFETCH_TILES, ELT)
    wait_for_previous_grid(PDL, TRIGGER)  # programmatic dependent launch (ops/pdl.py)
    i_s, i_b, o_m, m_m, limit, start, end = _split_program(len_ptr, M, T, H, keys_per_split, BLOCK_M)
    o_r = tl.arange(0, R)
    o_d = tl.arange(0, DR)

    b_q = tl.load(q_lat_ptr + i_b * stride_qb + o_m[:, None] * stride_qm + o_r[None, :], mask=m_m[:, None], other=0.0)
    b_qr = tl.load(q_rope_ptr + i_b * stride_qrb + o_m[:, None] * stride_qrm + o_d[None, :], mask=m_m[:, None],
                   other=0.0)
    b_qt = tl.trans(b_q)  # [R, BLOCK_M]
    b_qrt = tl.trans(b_qr)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([R, BLOCK_M], dtype=tl.float32)
    if TMA:
        # the tiles through the tensor-memory accelerator: one instruction per box, the copy tracked by a
        # barrier instead of registers, so the pipelined loads of later tiles stay in flight while this
        # tile's products and softmax run. The descriptors end at the split's last key: rows past it
        # (the next split's, or past the sequence's length, never written) arrive as zeros, the masked
        # load's `other`, so unwritten cache rows never reach the products.
        rows = tl.maximum(end, 1).to(tl.int32)
        d_c = tl.make_tensor_descriptor(c_ptr + i_b * stride_cb, shape=[rows, R], strides=[stride_cl, 1],
                                        block_shape=[BLOCK_N, R])
        d_kr = tl.make_tensor_descriptor(kr_ptr + i_b * stride_krb, shape=[rows, DR], strides=[stride_krl, 1],
                                         block_shape=[BLOCK_N, DR])
    for j0 in range(start, end, BLOCK_N):
        o_n = j0 + tl.arange(0, BLOCK_N)
        m_n = o_n < end
        if TMA:
            j32 = tl.cast(j0, tl.int32)
            b_c = d_c.load([j32, 0])
            b_kr = d_kr.load([j32, 0])
        else:
            b_c = tl.load(c_ptr + i_b * stride_cb + o_n[:, None] * stride_cl + o_r[None, :], mask=m_n[:, None],
                          other=0.0)
            b_kr = tl.load(kr_ptr + i_b * stride_krb + o_n[:, None] * stride_krl + o_d[None, :], mask=m_n[:, None],
                           other=0.0)
        b_s = (tl.dot(b_c, b_qt) + tl.dot(b_kr, b_qrt)) * sm_scale  # [BLOCK_N, BLOCK_M]
        b_s = tl.where((o_n[:, None] < limit[None, :]) & m_n[:, None], b_s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(b_s, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no (-inf) - (-inf) for rows without keys yet
        b_p = tl.exp(b_s - m_safe[None, :])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(b_p, 0)
        acc = acc * alpha[None, :] + tl.dot(tl.trans(b_c), b_p.to(b_c.dtype))
        m_i = m_new

    lse, den = _split_lse(m_i, l_i)
    out = acc / den[None, :]
    p_o = o_ptr + i_b * stride_ob + i_s * stride_os + o_m[None, :] * stride_om + o_r[:, None]
    tl.store(p_o, out, mask=m_m[None, :])
    tl.store(lse_ptr + i_b * stride_lb + i_s * stride_ls + o_m, lse, mask=m_m)


# Why a kernel: merging in PyTorch (max, isfinite/where, exp, multiply, two sums, divide) was ~8
# launches and ~50 us per MLA layer per decode token on an H100, more than the attention itself.
@triton.jit
def _latent_attn_merge_kernel(
    o_ptr, lse_ptr, ctx_ptr, S,
    stride_ob, stride_os, stride_om, stride_lb, stride_ls, stride_cb, stride_cm,
    BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, SUB_S: tl.constexpr, PDL: tl.constexpr,
    TRIGGER: tl.constexpr = True,
):
    """Merge the split-KV partials: ``o [B, S, M, R]`` fp32 (per-split normalised contexts) and
    ``lse [B, S, M]`` fp32 (per-split log-sum-exps, ``-inf`` for a split that saw no key) into
    ``ctx [B, M, R]`` (any float dtype; the last dims of ``o`` and ``ctx`` contiguous):

        ctx = sum_s w_s o_s / max(sum_s w_s, 2^-126),   w_s = exp(lse_s - max_s lse)

    A row with ``lse = -inf`` in every split gets 0. Splits of weight 0 are not read. Program
    ``(b, m, r-block)`` takes the max over ``S`` in chunks of ``BLOCK_S``, then sums
    ``[SUB_S, BLOCK_R]`` tiles of ``o`` in fp32. ``BLOCK_R`` must divide ``R``.
    """
    wait_for_previous_grid(PDL, TRIGGER)
    i_b = tl.program_id(0).to(tl.int64)
    i_m = tl.program_id(1).to(tl.int64)
    o_r = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
    p_lse = lse_ptr + i_b * stride_lb + i_m
    mx = tl.full([BLOCK_S], float("-inf"), dtype=tl.float32)
    for s0 in range(0, S, BLOCK_S):
        o_s = s0 + tl.arange(0, BLOCK_S)
        mx = tl.maximum(mx, tl.load(p_lse + o_s * stride_ls, mask=o_s < S, other=float("-inf")))
    mx = tl.max(mx, 0)
    # no key in any split: shift by 0 so every weight is exp(-inf) = 0 (no (-inf) - (-inf) = NaN)
    mx = tl.where(mx == float("-inf"), 0.0, mx)

    acc = tl.zeros([SUB_S, BLOCK_R], dtype=tl.float32)
    den = tl.zeros([SUB_S], dtype=tl.float32)
    p_o = o_ptr + i_b * stride_ob + i_m * stride_om + o_r[None, :]
    for s0 in range(0, S, SUB_S):
        o_s = (s0 + tl.arange(0, SUB_S)).to(tl.int64)
        w = tl.exp(tl.load(p_lse + o_s * stride_ls, mask=o_s < S, other=float("-inf")) - mx)
        b_o = tl.load(p_o + o_s[:, None] * stride_os, mask=(w > 0)[:, None], other=0.0)
        acc += w[:, None] * b_o
        den += w
    ctx = tl.sum(acc, 0) / tl.maximum(tl.sum(den, 0), 1.1754943508222875e-38)  # 2^-126
    tl.store(ctx_ptr + i_b * stride_cb + i_m * stride_cm + o_r, ctx.to(ctx_ptr.dtype.element_ty))


# Why a one-pass form: the kernel above is a chain of dependent loads -- the lse of every split, then per
# chunk of splits the lse again and the partials masked by their weights (so each load waits for the one
# before): at batch 1 ~5.6-6 us per MLA layer and step at every context (S = 64-132 splits), for 4-9 MB
# that the split kernel has just left in L2.
@triton.jit
def _latent_attn_merge_one_pass_kernel(
    o_ptr, lse_ptr, ctx_ptr, S,
    stride_ob, stride_os, stride_om, stride_lb, stride_ls, stride_cb, stride_cm,
    BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, PDL: tl.constexpr, TRIGGER: tl.constexpr = True,
):
    """The merge of :func:`_latent_attn_merge_kernel` (same contract) for ``S <= BLOCK_S``: every split's
    lse and ``[BLOCK_S, BLOCK_R]`` partials are loaded at once, with no load waiting on another, then
    weighted and summed. A keyless split's partials (weight 0, possibly NaN) are loaded but never
    multiplied: ``tl.where`` drops them."""
    wait_for_previous_grid(PDL, TRIGGER)
    i_b = tl.program_id(0).to(tl.int64)
    i_m = tl.program_id(1).to(tl.int64)
    o_r = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
    o_s = tl.arange(0, BLOCK_S).to(tl.int64)
    b_lse = tl.load(lse_ptr + i_b * stride_lb + i_m + o_s * stride_ls, mask=o_s < S, other=float("-inf"))
    b_o = tl.load(o_ptr + i_b * stride_ob + i_m * stride_om + o_s[:, None] * stride_os + o_r[None, :],
                  mask=(o_s < S)[:, None], other=0.0)
    mx = tl.max(b_lse, 0)
    mx = tl.where(mx == float("-inf"), 0.0, mx)  # no key in any split: every weight exp(-inf) = 0
    w = tl.exp(b_lse - mx)
    ctx = tl.sum(tl.where((w > 0)[:, None], w[:, None] * b_o, 0.0), 0)
    ctx = ctx / tl.maximum(tl.sum(w, 0), 1.1754943508222875e-38)  # 2^-126
    tl.store(ctx_ptr + i_b * stride_cb + i_m * stride_cm + o_r, ctx.to(ctx_ptr.dtype.element_ty))


# The merge in one pass where the splits fit one tile (S <= max_splits): tiles [next_pow2(S), block_r] fp32
# on `num_warps` warps; MERGE_ONE_PASS: a switch for A/B runs. H100, benchmark model, graph-replayed step
# (results/decode/session29/ab_merge_one_pass_h100.txt; chunked -> one pass in tiles of 4096, i.e. block_r 64
# at 64 splits (4K keys) and 16 at 129-132 (64K keys on)): 2.807 -> 2.800 ms at 4K, 3.015 -> 3.009 at 64K,
# 3.196 -> 3.190 at 128K. The merge alone (merge_sweep_h100.txt, us per call, graph of PDL launches): at 132
# splits chunked 5.2, block_r 16 4.65, 32 3.87, 64 3.67 (2 / 8 warps slower); at 64 splits 2.99 / 2.45 (64).
MERGE_ONE_PASS = True
MERGE_TILES = dict(max_splits=256, block_r=64, num_warps=4)


def _merge_splits(o_part: torch.Tensor, lse: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``o_part [B, S, M, R]`` fp32, ``lse [B, S, M]`` fp32 -> ``out [B, M, R]`` (written, returned).
    Launch settings depend on shapes only (graph-capturable)."""
    B, S, M, R = o_part.shape
    if tuple(out.shape) != (B, M, R) or tuple(lse.shape) != (B, S, M):
        raise ValueError(f"merge: o_part {tuple(o_part.shape)}, lse {tuple(lse.shape)}, out {tuple(out.shape)}")
    if o_part.stride(-1) != 1 or lse.stride(-1) != 1 or out.stride(-1) != 1:
        raise ValueError("merge: o_part, lse and out need a contiguous last dim")
    if MERGE_ONE_PASS and S <= MERGE_TILES["max_splits"]:
        block_s = triton.next_power_of_2(S)
        block_r = min(triton.next_power_of_2(R), MERGE_TILES["block_r"])
        if R % block_r == 0:
            _latent_attn_merge_one_pass_kernel[(B, M, R // block_r)](
                o_part, lse, out, S,
                o_part.stride(0), o_part.stride(1), o_part.stride(2), lse.stride(0), lse.stride(1),
                out.stride(0), out.stride(1),
                BLOCK_R=block_r, BLOCK_S=block_s, num_warps=MERGE_TILES["num_warps"],
                **pdl_launch(out.device, "latent_merge"),
            )
            return out
    # tiles of <= 4096 fp32: [64, 64] for many splits, wider in R when there are few (large batch)
    sub_s = min(64, triton.next_power_of_2(S))
    block_r = min(triton.next_power_of_2(R), max(64, 4096 // sub_s))
    if R % block_r:
        raise ValueError(f"merge: R={R} must be a multiple of {block_r}")
    _latent_attn_merge_kernel[(B, M, R // block_r)](
        o_part, lse, out, S,
        o_part.stride(0), o_part.stride(1), o_part.stride(2), lse.stride(0), lse.stride(1),
        out.stride(0), out.stride(1),
        BLOCK_R=block_r, BLOCK_S=min(512, triton.next_power_of_2(S)), SUB_S=sub_s,
        num_warps=8 if S > 128 else 4,  # measured on an H100 (R=512, M=32)
        **pdl_launch(out.device, "latent_merge"),
    )
    return out


# Launch settings of the split kernel (block_n, warps and stages for wide latents, R >= 256; smaller R,
# the tests' toy shapes, take BLOCK_N 16, 4 warps, 2 stages). benchmarks/latent_attention_sweep.py times others at 4K..1M keys.
#   block_n: keys per iteration; head_groups: programs per split sharing the M query rows (fewer rows
#   per program: a smaller accumulator, more programs; the latent tile is re-read, mostly from L2);
#   min_block_m: pad the rows to at least this (64 lets tl.dot take Hopper's wgmma);
#   splits_per_sm: key-axis splits per SM at batch 1 (divided by the batch size).
# H100, bf16, 32 heads x 576 (results/decode/session10/latent_sweep*_h100.txt, whole call graph-replayed,
# floor = cache bytes over the 3.0 TB/s copy rate), session 6's tiles (32 keys, 8 warps, 2 splits per
# SM) -> these: 852 -> 503 us at 1M keys (floor 406), 4909 -> 2821 at 6 x 1M (floor 2420: 86%), 138 ->
# 87 at 128K (floor 53), 22 -> 18 at 4K (floor 4.4; fixed costs dominate). One program holding all 32
# rows needs 254 registers (one 8-warp program per SM); two programs of 16 rows each re-read the tile
# (from L2) but run side by side. 64 keys x 3 stages does not fit in shared memory. Half as many splits
# (session 11, results/decode/session11/latent_sweep_round3_h100.txt) is much slower: 86 -> 121 us at 128K,
# 490 -> 746 at 1M; the time follows the keys per program, so each program is bound by its own load
# latency and more of them in flight, not fewer, is the direction.
#   keys_major_from: from this many cached keys (the attended span L) on, the keys-major kernel
#   (_latent_attn_split_keys_major_kernel: the products transposed so that wgmma takes them) with
#   keys_major_rows query rows per program (head_groups and min_block_m apply to the other kernel only).
#   Session 12 (results/decode/session12/latent_sweep_round4_h100.txt, round5): keys-major with all 32
#   rows in one 4-warp program, against the rows-major tiles above: 19.3-19.8 vs 17.6 us at 4K, 88.3 vs
#   88.9 at 128K, 485 vs 506 at 1M, 2701 vs 2865 at 6 x 1M (89% of the floor rate); 8 warps, two row
#   groups, 2 splits per SM and 32-key tiles in 3-4 stages were all slower. Nsight Compute at 128K
#   (ncu_latent_keys_major_128k_h100.txt): 188 KB of shared memory and 255 registers hold one 4-warp
#   program per SM, one warp per scheduler, no warp eligible 78% of cycles, DRAM at 54%: still bound by
#   one program's serial chain of tile wait, products and softmax. What would lift it is a producer
#   warp streaming tiles (TMA) beside the computing warps (warp specialisation), not another tile.
#   Session 13, in the model (results/decode/session13/latent_switch_in_model_h100.txt, graph-replayed
#   step, one process per setting): keys-major from 128K keys 3.318-3.331 ms at 128K against 3.342-3.362
#   for the rows-major kernel with the Triton absorptions; at 64K a tie (3.130 vs 3.129): from 128K on.
#   keys_major_tma: the keys-major kernel reads its tiles through tensor descriptors (TMA, Hopper and
#   later; descriptors made on the device, so each split's bound is its own last key). The copy engine
#   keeps the next tile in flight without registers (237 instead of 255 + spills): whole call, H100,
#   graph-replayed (results/decode/session23/latent_sweep_tma_h100.txt): 128K keys 87.9 -> 80.2 us
#   (rows-major 90.1), 1M 485.2 -> 449.7 (90% of the floor rate), 64K 55.2 against the rows-major 57.2,
#   32K 42.4 against 40.9; in the model's graph-replayed step 3.335 -> 3.262 ms at 128K and, with the
#   switch at 64K, 3.127 / 3.131 -> 3.092 / 3.096 there (ab_tma_128k_h100.txt, in_model_64k_h100.txt):
#   on, from 64K keys. (32-key tiles in 4 stages, 8 warps, 2 splits per SM: slower. Fewer, longer
#   splits with TMA, 0.5 / 0.75 per SM: 71.1 / 60.3 us against 54.9 at 64K, 742 / 524 against 449 at 1M
#   (latent_sweep_fewer_splits_tma_h100.txt). The per-split contexts stored in bf16 (half the partials'
#   bytes): 55.8 -> 56.4 us at 64K, 451 -> 461 at 1M, the step 3.086 -> 3.082 ms at 64K, 3.269 -> 3.268
#   at 128K (half_partials_*_h100.txt): no gain, reverted, commit 2dfed50 has it.)
#   prefetch_tiles: the keys-major kernel asks the L2 for its split's first this many tiles before its PDL
#   wait (0: not; Hopper, rows back to back); the query absorption before it placing it early
#   (pdl.EARLY_TRIGGER["absorb_query_keys_major"]) gives that prefetch a window. H100, benchmark model,
#   graph-replayed step, both with that trigger (results/decode/session29/ab_prefetch_h100.txt): 0 -> 2 tiles
#   3.011 -> 3.005 ms at 64K, 3.191 -> 3.183 at 128K; the trigger alone is neutral (3.009 / 3.190 at exit).
#   1 tile against 2 (ab_prefetch_1_2_h100.txt): 2.997 / 2.999 ms at 64K, 3.174 / 3.180 at 128K. (The split
#   and the merge triggering early were slower again, ab_split_trigger / ab_merge_trigger_h100.txt.)
#   (The query absorption asking for the first tile before its own wait, while the latent cache write ahead
#   of it runs, and the split kernel for the second: 2.995 -> 2.996 ms at 64K, 3.172 -> 3.174 at 128K, the
#   absorption 3.7 -> 5.8 us in the eager profile; ab_absorb_prefetch_h100.txt; removed, commit 0b92d4d has it.)
TILES: dict[str, float] = dict(block_n=64, num_warps=4, num_stages=2, head_groups=2, min_block_m=16, splits_per_sm=1,
                               keys_major_from=65536, keys_major_rows=32, keys_major_tma=1, prefetch_tiles=1)
# The absorbed projections of a few tokens as Triton kernels (ops/latent_absorb_triton.py) rather than
# batched matmuls (cuBLAS), with the rows-major split kernel only; a switch for A/B runs in one process
# (decode_profile.py --ab). H100, benchmark model, graph-replayed step (results/decode/session13/
# ab_triton_absorb*_h100.txt): 2.873 -> 2.864 ms at 4K, 3.132 -> 3.118 at 64K, 3.340 -> 3.344 at 128K
# (rows-major); with the keys-major kernel 3.735 -> 3.781 at 256K and 6.073 -> 6.103 at 1M (cause not
# found), so there the matmuls stay
TRITON_ABSORB = True
# the same with the keys-major split kernel: off. Session 13 measured them slower there at 256K and 1M;
# session 23 again with the TMA tiles (graph-replayed step, decode_profile --ab, session23/
# ab_triton_absorb_keys_major_h100.txt): 3.099 -> 3.139 ms at 64K, 3.274 -> 3.315 at 128K, 5.817 -> 5.851 at 1M
# Session 25, with the per-kernel PDL triggers of session 24 (the split and merge kernels trigger at exit) and
# the query absorption before the keys-major kernel at exit too (pdl.EARLY_TRIGGER["absorb_query_keys_major"]):
# 3.047 -> 3.025 ms at 64K (results/decode/session25/ab_triton_absorb_triggers_h100.txt), so on
TRITON_ABSORB_KEYS_MAJOR = True
# The keys-major split kernel launched with or without PDL (an A/B switch; without it, its programs are
# placed only when the query side has finished). Session 24 also timed the output absorption alone as the
# Triton kernel (a switch removed once both sides were: docs/decode.md)
PDL_KEYS_MAJOR = True
# (Session 24: the merge and the output absorption in one PDL launch, each program merging its row's whole
# context from the splits and multiplying a 32-row block of W_uv[h]: neutral at 4K (2.867 -> 2.863 ms),
# slower from 64K (3.092 -> 3.136, 3.269 -> 3.319 at 128K): each program's serial chain over the 128
# splits' 270 KB, where the merge splits the row over 8 programs; commit ad9f994 has it,
# results/decode/session24/ab_merge_absorb_h100.txt)
SMEM_TILE_BYTES = 160 * 1024  # budget for the latent tiles in flight (stages x block_n x (R + DR) x element size)
SMEM_KEYS_MAJOR_BYTES = 200 * 1024  # the keys-major kernel: its tiles in flight + the query rows


def _scratch(size: int, alignment: int, stream) -> torch.Tensor:
    """Triton's global scratch for descriptors made inside a kernel (128 bytes per program), from
    PyTorch's caching allocator on the current device (inside a graph capture: the graph's pool)."""
    return torch.empty(size, dtype=torch.int8, device=torch.device("cuda", torch.cuda.current_device()))


def _ensure_scratch_allocator() -> None:
    """Give Triton :func:`_scratch` unless the caller already set an allocator of their own (Triton's
    default refuses every request)."""
    try:
        from triton.runtime import _allocation

        if not isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
            return
    except (ImportError, AttributeError):  # another Triton's internals: set ours
        pass
    triton.set_allocator(_scratch)


def _tma_ok(*tensors: torch.Tensor) -> bool:
    """Whether TMA may read these ``[B, L, D]`` tensors: a GPU of compute capability 9+ (or the
    interpreter), 16-byte aligned base and batch / row strides."""
    from kimi_linear.backends import triton_interpret

    if not (hopper_or_later(tensors[0].device) or triton_interpret()):
        return False
    return all(t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0
               and (t.stride(1) * t.element_size()) % 16 == 0 for t in tensors)


def _prefetch_ok(latent: torch.Tensor, k_rope: torch.Tensor, rows: int) -> bool:
    """Whether the keys-major kernel may ask the L2 for its first ``rows`` keys before its wait
    (``latent_prefetch_kernel.prefetch_split_tiles``): a Hopper GPU (the bulk prefetch instruction; not the interpreter), rows
    stored back to back in both tensors, and the pieces the 2 x 64 lanes take 16-byte multiples."""
    from kimi_linear.backends import triton_interpret

    if triton_interpret() or not hopper_or_later(latent.device) or latent.dtype != k_rope.dtype:
        return False
    return (latent.stride(1) == latent.shape[2] and k_rope.stride(1) == k_rope.shape[2]
            and all(t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0 for t in (latent, k_rope))
            and all((rows * t.shape[2] * t.element_size()) % (64 * 16) == 0 for t in (latent, k_rope)))


def _num_splits(B: int, L: int, block_n: int, device: torch.device, per_sm: float = 2) -> int:
    """Key-axis splits: ``per_sm`` per SM at batch 1 (fractional: fewer, longer splits), divided by B."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    else:
        sms = 4
    want = max(1, int(per_sm * sms) // max(B, 1))
    return max(1, min(want, triton.cdiv(L, block_n)))


def latent_attention_triton(
    q_nope: torch.Tensor,
    q_rope: torch.Tensor,
    latent: torch.Tensor,
    k_rope: torch.Tensor,
    w_kv_b: torch.Tensor,
    *,
    lengths: torch.Tensor,
    scale: float | None = None,
    block_n: int | None = None,
    num_splits: int | None = None,
    prefetch_after_split: torch.Tensor | None = None,
) -> torch.Tensor:
    """Absorbed MLA attention with the split-KV Triton kernel. Same contract as ``latent_attention_ref``
    (``lengths`` form only). No host sync: shapes alone fix the launch, so it can be graph-captured.
    ``prefetch_after_split``: forked into L2 on a side stream after the split kernel (``ops/prefetch.py``)."""
    B, T, H, Dn, Dr, L, R, Dv = _check(q_nope, q_rope, latent, k_rope, w_kv_b, lengths, None)
    if R & (R - 1) or Dr & (Dr - 1) or R < 16 or Dr < 16:
        raise ValueError(f"the Triton latent kernel needs power-of-two R, Dr >= 16, got R={R}, Dr={Dr}")
    scale = (Dn + Dr) ** -0.5 if scale is None else float(scale)
    M = T * H
    wide = R >= 256
    keys_major = L >= TILES.get("keys_major_from", 1 << 62)
    if keys_major:
        block_m = max(16, triton.next_power_of_2(min(M, int(TILES.get("keys_major_rows", 32)))))
    else:
        groups = min(TILES["head_groups"], triton.cdiv(M, 16))
        block_m = max(16, TILES["min_block_m"], triton.next_power_of_2(triton.cdiv(M, groups)))
    groups = triton.cdiv(M, block_m)
    stages = TILES["num_stages"] if wide else 2
    if block_n is None:
        block_n = TILES["block_n"] if wide else 16
        # the pipelined [block_n, R + DR] tiles must fit in shared memory (228 KB on an H100): an fp32
        # cache (the fp32 model) takes half the keys of a bf16 one; the keys-major kernel also keeps the
        # query rows there (the products' shared-memory operand)
        q_bytes = block_m * (R + Dr) * latent.element_size() if keys_major else 0
        budget = SMEM_KEYS_MAJOR_BYTES if keys_major else SMEM_TILE_BYTES
        while block_n > 16 and block_n * (R + Dr) * latent.element_size() * stages + q_bytes > budget:
            block_n //= 2
    S = num_splits or _num_splits(B, L, block_n, latent.device, TILES["splits_per_sm"])
    keys_per_split = triton.cdiv(triton.cdiv(L, S), block_n) * block_n
    S = triton.cdiv(L, keys_per_split)

    w_uk, w_uv = split_kv_b(w_kv_b, H, Dn, Dv)
    kdt = latent.dtype
    # a few tokens (decode) before the rows-major split kernel: the absorbed projections as Triton
    # kernels (PDL, each weight tile read once for all tokens); otherwise batched matmuls (TRITON_ABSORB)
    few = TRITON_ABSORB and B * T <= absorb.MAX_TOKENS and w_kv_b.is_contiguous()
    triton_absorb = few and (TRITON_ABSORB_KEYS_MAJOR or not keys_major)
    if triton_absorb:
        q_lat = absorb.absorb_query(q_nope.to(w_kv_b.dtype).reshape(B * T, H, Dn), w_kv_b, kdt,
                                    before_keys_major=keys_major).view(B, M, R)
    else:
        q_lat = torch.einsum("bthd,hdr->bthr", q_nope.to(w_uk.dtype), w_uk).reshape(B, M, R).to(kdt).contiguous()
    # q_rope is usually a column slice of the query projection: read it in place through its row
    # stride (a contiguous copy was one more launch per MLA layer and decode step)
    q_r = q_rope.reshape(B, M, Dr).to(kdt)
    if q_r.stride(-1) != 1:
        q_r = q_r.contiguous()
    if latent.stride(-1) != 1 or k_rope.stride(-1) != 1:
        raise ValueError("latent and k_rope need a contiguous last dim")
    o_part = torch.empty(B, S, M, R, device=latent.device, dtype=torch.float32)
    lse = torch.empty(B, S, M, device=latent.device, dtype=torch.float32)
    lengths = lengths.to(device=latent.device)
    kernel = _latent_attn_split_keys_major_kernel if keys_major else _latent_attn_split_kernel
    extra = dict(pdl_launch(latent.device, "latent_keys_major" if keys_major else "latent_split"))
    if keys_major and not PDL_KEYS_MAJOR:
        extra.update(PDL=False, launch_pdl=False)
    if keys_major and TILES.get("keys_major_tma") and _tma_ok(latent, k_rope):
        extra["TMA"] = True
        if latent.device.type == "cuda":
            _ensure_scratch_allocator()
    ahead = int(TILES.get("prefetch_tiles", 0))
    if keys_major and ahead > 0 and _prefetch_ok(latent, k_rope, block_n * ahead):
        extra.update(PREFETCH_TILES=ahead, ELT=latent.element_size())
    kernel[(groups, S, B)](
        q_lat, q_r, latent, k_rope, lengths, o_part, lse,
        L, M, T, H, keys_per_split, scale,
        q_lat.stride(0), q_lat.stride(1), q_r.stride(0), q_r.stride(1),
        latent.stride(0), latent.stride(1), k_rope.stride(0), k_rope.stride(1),
        o_part.stride(0), o_part.stride(1), o_part.stride(2), lse.stride(0), lse.stride(1),
        R=R, DR=Dr, BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=TILES["num_warps"] if wide else 4, num_stages=stages, **extra,
    )
    # after the split kernel, not before it: at long context that kernel streams the cache, and a prefetch
    # beside it takes its bandwidth; the merge and the absorption after it leave HBM mostly idle
    prefetch_l2_(prefetch_after_split)
    ctx = _merge_splits(o_part, lse, torch.empty(B, M, R, device=latent.device, dtype=w_uv.dtype))
    if triton_absorb:
        return absorb.absorb_output(ctx.view(B * T, H, R), w_kv_b, Dn, q_nope.dtype).view(B, T, H, Dv)
    out = torch.einsum("bthr,hvr->bthv", ctx.view(B, T, H, R), w_uv)
    return out.to(q_nope.dtype)
