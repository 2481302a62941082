"""Routed experts for a few tokens (decoding) without a host sync: each chosen expert's weights read once.

:func:`kimi_linear.ops.moe.grouped_swiglu` sorts tokens by expert and reads the group sizes on the
host, which a CUDA graph cannot capture. At decode sizes (a handful to a few hundred tokens) the cost
is reading the weights of the experts that any token chose, so this path is organised by expert:
program ``(e, block)`` returns at once when no token chose expert ``e`` (its weights are never read),
and otherwise multiplies its weight tile with every token of the step, the tokens that did not choose
``e`` getting combine weight 0. Bytes moved: the chosen experts' weights once, whatever the batch.

| tensor    | shape              | notes                                                |
|-----------|--------------------|------------------------------------------------------|
| x         | ``[N, D]``         | tokens of the step                                   |
| indices   | ``[N, k]`` int     | chosen experts                                       |
| weights   | ``[N, k]`` fp32    | combine weights (router output, already scaled)      |
| w1, w3    | E x ``[I, D]``     | gate / up projections (``nn.Linear`` layout)         |
| w2        | E x ``[D, I]``     | down projection                                      |
| return    | ``[N, D]``         | dtype of x; ``sum_slot weight * w2_e(silu(w1_e x) * w3_e x)`` |

Experts stay separate tensors (the checkpoint's layout); the kernels find them through a table of
their addresses, built once per weight set and cached.

One token (batch-1 decoding) takes two other kernels: programs walk the token's ``k`` chosen experts
and the shared ones ("slots") by row blocks, multiplying with the token as a vector -- no tensor-core
tile that would be 15/16 padding, no programs that exit at once. ``h [slots, I]`` sits between them.

Two options fold the decode step's residual add + RMSNorm into these launches (docs/decode.md):
``norm_weight [D]``: ``x`` is the un-normalised hidden state and the experts see
``rms_norm(x, norm_weight, eps)``; the one-token gate/up kernel sums ``x^2`` in its D loop, multiplies
``x`` by the norm weight as it loads it and scales both fp32 sums by ``rstd`` before the SwiGLU (a
product is linear in its input: ``W (x * rstd * w) = rstd * W (x * w)``). ``residual [N, D]``: the
output is ``residual + y``, ``y`` rounded to x's dtype first, as the separate add would see it; the
one-token down kernel adds it in its epilogue. The several-token kernels and the reference path apply
both in PyTorch (same values, not fused).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kimi_linear.backends import resolve_backend
from kimi_linear.ops.moe import grouped_swiglu
from kimi_linear.ops.norm import rms_norm
from kimi_linear.ops.pdl import pdl_launch

_PTR_TABLES: dict[tuple[int, ...], tuple[torch.Tensor, int]] = {}


def _pointer_table(ws: Sequence[torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Device table of the weights' addresses (the kernels read each expert through it), cached per
    weight set, and their common alignment in bytes (16, or 1 if any is not 16-byte aligned): an
    address read from a table is of unknown alignment to the compiler, which then loads the weights
    one element at a time unless told (``W_ALIGN``). A new set is checked first: the kernels read raw
    addresses as x's dtype, row-major."""
    key = tuple(w.data_ptr() for w in ws)
    hit = _PTR_TABLES.get(key)
    if hit is None:
        for i, w in enumerate(ws):
            if w.device != x.device or w.dtype != x.dtype or not w.is_contiguous():
                raise ValueError(f"expert weight {i} must be a contiguous {x.dtype} tensor on {x.device} (x's), "
                                 f"got {w.dtype} on {w.device}{'' if w.is_contiguous() else ', not contiguous'}")
        hit = (torch.tensor(key, dtype=torch.int64, device=ws[0].device), 16 if all(a % 16 == 0 for a in key) else 1)
        _PTR_TABLES[key] = hit
    return hit


def _kernels():
    import triton
    import triton.language as tl

    # a module global, not a closure variable: Triton's interpreter resolves a kernel's names there only
    global wait_for_previous_grid
    from kimi_linear.ops.pdl_kernel import wait_for_previous_grid

    @triton.jit
    def gate_up_kernel(x_ptr, idx_ptr, w1_tab, w3_tab, h_ptr, N, D, I, NK, ER,
                       BLOCK_N: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_D: tl.constexpr,
                       BLOCK_NK: tl.constexpr, W_ALIGN: tl.constexpr, PDL: tl.constexpr, TRIGGER: tl.constexpr = True):
        # experts i_e >= ER are shared ones: every token uses them
        wait_for_previous_grid(PDL, TRIGGER)  # before the early exit below: ops/pdl.py
        i_e = tl.program_id(0)
        i_i = tl.program_id(1)
        i_n = tl.program_id(2)
        o_nk = tl.arange(0, BLOCK_NK)
        chosen = tl.load(idx_ptr + o_nk, mask=o_nk < NK, other=-1)
        if (i_e < ER) & (tl.sum((chosen == i_e).to(tl.int32), 0) == 0):
            return  # nobody chose this expert: its weights are never read
        w1 = tl.multiple_of(tl.load(w1_tab + i_e).to(tl.pointer_type(x_ptr.dtype.element_ty)), W_ALIGN)
        w3 = tl.multiple_of(tl.load(w3_tab + i_e).to(tl.pointer_type(x_ptr.dtype.element_ty)), W_ALIGN)
        o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
        o_i = i_i * BLOCK_I + tl.arange(0, BLOCK_I)
        m_n, m_i = o_n < N, o_i < I
        acc1 = tl.zeros([BLOCK_N, BLOCK_I], dtype=tl.float32)
        acc3 = tl.zeros([BLOCK_N, BLOCK_I], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            o_d = d0 + tl.arange(0, BLOCK_D)
            m_d = o_d < D
            b_x = tl.load(x_ptr + o_n[:, None].to(tl.int64) * D + o_d[None, :], mask=m_n[:, None] & m_d[None, :], other=0.0)
            p_w = o_i[None, :].to(tl.int64) * D + o_d[:, None]  # W^T tile [BLOCK_D, BLOCK_I]
            m_w = m_i[None, :] & m_d[:, None]
            acc1 += tl.dot(b_x, tl.load(w1 + p_w, mask=m_w, other=0.0))
            acc3 += tl.dot(b_x, tl.load(w3 + p_w, mask=m_w, other=0.0))
        h = acc1 * tl.sigmoid(acc1) * acc3
        p_h = h_ptr + (i_e.to(tl.int64) * N + o_n[:, None]) * I + o_i[None, :]
        tl.store(p_h, h.to(h_ptr.dtype.element_ty), mask=m_n[:, None] & m_i[None, :])

    @triton.jit
    def down_kernel(h_ptr, idx_ptr, cw_ptr, w2_tab, y_ptr, N, D, I, K, NK, ER,
                    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_I: tl.constexpr,
                    BLOCK_NK: tl.constexpr, W_ALIGN: tl.constexpr, PDL: tl.constexpr, TRIGGER: tl.constexpr = True):
        wait_for_previous_grid(PDL, TRIGGER)
        i_e = tl.program_id(0)
        i_d = tl.program_id(1)
        i_n = tl.program_id(2)
        o_nk = tl.arange(0, BLOCK_NK)
        chosen = tl.load(idx_ptr + o_nk, mask=o_nk < NK, other=-1)
        if (i_e < ER) & (tl.sum((chosen == i_e).to(tl.int32), 0) == 0):
            return
        w2 = tl.multiple_of(tl.load(w2_tab + i_e).to(tl.pointer_type(h_ptr.dtype.element_ty)), W_ALIGN)
        o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
        o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
        m_n, m_d = o_n < N, o_d < D
        # combine weight of expert e for each token: sum over its k slots of weight * [index == e]
        c = tl.zeros([BLOCK_N], dtype=tl.float32)
        for s in range(0, K):
            e_s = tl.load(idx_ptr + o_n * K + s, mask=m_n, other=-1)
            w_s = tl.load(cw_ptr + o_n * K + s, mask=m_n, other=0.0)
            c += tl.where(e_s == i_e, w_s, 0.0)
        c = tl.where(i_e >= ER, 1.0, c)  # a shared expert enters every token with weight 1
        acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        for i0 in range(0, I, BLOCK_I):
            o_i = i0 + tl.arange(0, BLOCK_I)
            m_i = o_i < I
            b_h = tl.load(h_ptr + (i_e.to(tl.int64) * N + o_n[:, None]) * I + o_i[None, :],
                          mask=m_n[:, None] & m_i[None, :], other=0.0)
            b_w = tl.load(w2 + o_d[None, :].to(tl.int64) * I + o_i[:, None], mask=m_d[None, :] & m_i[:, None], other=0.0)
            acc += tl.dot(b_h, b_w)
        acc = acc * c[:, None]
        tl.atomic_add(y_ptr + o_n[:, None].to(tl.int64) * D + o_d[None, :], acc, mask=m_n[:, None] & m_d[None, :])

    return gate_up_kernel, down_kernel


def _single_token_kernels():
    """The one-token kernels (:mod:`kimi_linear.ops.moe_one_kernel`, imported here: it needs Triton)."""
    from kimi_linear.ops import moe_one_kernel as k

    return k.gate_up_one_kernel, k.down_one_kernel


_KERNELS = None
_ONE_KERNELS = None
# Tile sizes and launch settings (benchmarks/moe_decode_sweep.py tries others on a GPU). At batch 1
# the grid is (experts, I / BLOCK_I): narrow tiles give more programs to stream the chosen experts'
# weights; BLOCK_N is 16 (tl.dot's minimum) or 32.
# Measured on an H100 (bf16, 16 experts top-8, D=2304, I=1024 at batch 1; results/decode/
# moe_decode_sweep_h100.txt): gate_up with BLOCK_I=32, BLOCK_D=128, 4 stages took the whole MoE from
# 102.9 to 71.5 us (floor 37.7 us); the best down tile gained 2 us, so down keeps its settings.
TILES: dict[str, dict[str, int | None]] = {
    "gate_up": dict(BLOCK_I=32, BLOCK_D=128, num_warps=4, num_stages=4),
    "down": dict(BLOCK_D=64, BLOCK_I=64, num_warps=4, num_stages=None),
    # one token: row blocks of the chosen experts only. H100 sweeps (results/decode/session6/
    # gemv_sweep_h100.log, gemv_sweep2_h100.log; 8 routed + 1 shared expert, bf16): whole MoE 58.1 us
    # against 105.5 for the tensor-core kernels above; floor 42.5 us (the 9 experts' 127 MB at the
    # measured 3.0 TB/s copy rate). Spreading the down projection's slots over programs that add into
    # an fp32 buffer measured slower (62.1-62.3 vs 59.9 us) and was removed.
    "gate_up_one": dict(BLOCK_R=4, BLOCK_D=256, num_warps=1),
    # down with its slot loop unrolled (gemv_sweep3_moe_unrolled_h100.log): whole MoE 55.6 us (was 58.1).
    # Session 10 (session10/moe_sweep_h100.txt): 1- and 2-row blocks and gate_up's D loop unrolled at
    # compile time (a variant kernel, since removed) gained nothing: 55.8-56.0 us with these tiles, 76% of
    # the copy rate (floor 42.4 us)
    # With the weights' loads vectorised (W_ALIGN; session10/moe_sweep_aligned_h100.txt): the tensor-core
    # kernels 105.5 -> 56.1 us, the single-token ones 55.8 -> 50.5 us, and 47.8 (89% of the copy rate)
    # with one row per down program
    "down_one": dict(BLOCK_R=1, BLOCK_I=1024, num_warps=1),
}
SINGLE_TOKEN_KERNELS = True  # N == 1 takes the slot-walking kernels (benchmarks compare both)
# With PDL and moe_decode(x_ready=True), the shared experts' gate/up programs run before their wait,
# beside the router (whose 9 programs leave the GPU nearly idle); decode_profile.py --compare-pdl
EARLY_SHARED_EXPERTS = True


def _index_tensor(indices: torch.Tensor) -> torch.Tensor:
    """The kernels read int32 or int64 expert indices as they come (the router gives int64): a cast
    would be one more launch per MoE layer in every decode step."""
    if indices.dtype in (torch.int32, torch.int64):
        return indices.contiguous()
    return indices.to(torch.int32).contiguous()


def _launch_kw(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if v is not None}


def moe_decode(
    x: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    w1: Sequence[torch.Tensor],
    w3: Sequence[torch.Tensor],
    w2: Sequence[torch.Tensor],
    *,
    shared: tuple[Sequence[torch.Tensor], Sequence[torch.Tensor], Sequence[torch.Tensor]] | None = None,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    residual: torch.Tensor | None = None,
    x_ready: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Routed-expert output for a few tokens (shapes in the module docstring); no host sync on Triton.

    ``shared = (w1s, w3s, w2s)``: always-on experts of the same shapes, added to every token with
    weight 1 in the same launches (a separate shared MLP would cost five more per MoE layer).
    ``norm_weight [D]``: the experts see ``rms_norm(x, norm_weight, eps)``; ``residual [N, D]`` (x's
    dtype): returns ``residual + output`` (both folded into the one-token kernels; module docstring).
    ``x_ready``: the caller promises that ``x`` was written before the kernel launched just before this
    call (the model's decode step: the router, which reads the same x), so that with programmatic
    dependent launch the one-token kernel's shared-expert programs start while that kernel runs."""
    if x.dim() != 2 or indices.shape != weights.shape or indices.shape[0] != x.shape[0]:
        raise ValueError(f"need x [N, D], indices and weights [N, k]; got {tuple(x.shape)}, "
                         f"{tuple(indices.shape)}, {tuple(weights.shape)}")
    _check_epilogues(x, norm_weight, residual)
    ER = len(w1)
    if shared is not None:
        if not (len(shared[0]) == len(shared[1]) == len(shared[2]) >= 1) or any(
                w.shape != w1[0].shape for w in (*shared[0], *shared[1])) or any(w.shape != w2[0].shape for w in shared[2]):
            raise ValueError("shared experts must have the routed experts' weight shapes")
        w1, w3, w2 = [*w1, *shared[0]], [*w3, *shared[1]], [*w2, *shared[2]]
    # the kernels have no backward: a forward that must carry a gradient takes the grouped path
    extra = [t for t in (norm_weight, residual) if t is not None]
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, weights, *w1, *w3, *w2, *extra))
    chosen = resolve_backend(backend, x.device)
    one_token = x.shape[0] == 1 and SINGLE_TOKEN_KERNELS and chosen == "triton" and not needs_grad
    if norm_weight is not None and not one_token:  # only the one-token kernel folds the norm
        x = rms_norm(x, norm_weight, eps, backend=backend)
    if chosen == "reference" or needs_grad:
        if shared is not None:  # the shared experts as extra slots of weight 1
            always = torch.arange(ER, len(w1), device=x.device).expand(x.shape[0], -1)
            indices = torch.cat([indices, always.to(indices.dtype)], dim=1)
            weights = torch.cat([weights.float(), torch.ones(always.shape, device=x.device)], dim=1)
        y = grouped_swiglu(x, indices, weights, w1, w3, w2)
        return y if residual is None else residual + y
    if one_token:
        return _moe_decode_one(x, indices, weights, w1, w3, w2, ER, norm_weight, eps, residual, x_ready)
    y = _moe_decode_many(x, indices, weights, w1, w3, w2, ER)
    return y if residual is None else residual + y


def _check_epilogues(x: torch.Tensor, norm_weight: torch.Tensor | None, residual: torch.Tensor | None) -> None:
    """Validate :func:`moe_decode`'s ``norm_weight [D]`` and ``residual [N, D]`` against ``x [N, D]``."""
    N, D = x.shape
    if norm_weight is not None and (not isinstance(norm_weight, torch.Tensor) or norm_weight.dim() != 1
                                    or norm_weight.shape[0] != D or norm_weight.device != x.device
                                    or not norm_weight.is_floating_point()):
        got = (f"{tuple(norm_weight.shape)} {norm_weight.dtype} on {norm_weight.device}"
               if isinstance(norm_weight, torch.Tensor) else type(norm_weight).__name__)
        raise ValueError(f"norm_weight must be a float [D={D}] tensor on x's device {x.device}, got {got}")
    if residual is not None and (not isinstance(residual, torch.Tensor) or tuple(residual.shape) != (N, D)
                                 or residual.dtype != x.dtype or residual.device != x.device):
        got = (f"{tuple(residual.shape)} {residual.dtype} on {residual.device}"
               if isinstance(residual, torch.Tensor) else type(residual).__name__)
        raise ValueError(f"residual must be [N={N}, D={D}] {x.dtype} on {x.device} (x's), got {got}")


def _moe_decode_many(x, indices, weights, w1, w3, w2, ER: int) -> torch.Tensor:
    """:func:`moe_decode` on the per-expert (tensor-core) kernels: any token count."""
    import triton

    global _KERNELS
    if _KERNELS is None:
        _KERNELS = _kernels()
    gate_up, down = _KERNELS
    N, D = x.shape
    E, I = len(w1), w1[0].shape[0]
    k = indices.shape[1]
    x = x.contiguous()
    idx = _index_tensor(indices)
    cw = weights.float().contiguous()
    block_n = 16 if N <= 16 else 32
    block_nk = triton.next_power_of_2(N * k)
    h = torch.empty(E, N, I, device=x.device, dtype=x.dtype)
    gu = TILES["gate_up"]
    (t1, a1), (t3, a3), (t2, a2) = _pointer_table(w1, x), _pointer_table(w3, x), _pointer_table(w2, x)
    gate_up[(E, triton.cdiv(I, gu["BLOCK_I"]), triton.cdiv(N, block_n))](
        x, idx, t1, t3, h, N, D, I, N * k, ER,
        BLOCK_N=block_n, BLOCK_NK=block_nk, W_ALIGN=min(a1, a3), **_launch_kw(gu), **pdl_launch(x.device, "moe_gate_up"))
    y = torch.zeros(N, D, device=x.device, dtype=torch.float32)
    dn = TILES["down"]
    down[(E, triton.cdiv(D, dn["BLOCK_D"]), triton.cdiv(N, block_n))](
        h, idx, cw, t2, y, N, D, I, k, N * k, ER,
        BLOCK_N=block_n, BLOCK_NK=block_nk, W_ALIGN=a2, **_launch_kw(dn), **pdl_launch(x.device, "moe_down"))
    return y.to(x.dtype)


def _moe_decode_one(x, indices, weights, w1, w3, w2, ER: int, norm_weight=None, eps: float = 1e-6,
                    residual=None, x_ready: bool = False) -> torch.Tensor:
    """:func:`moe_decode` for one token ``x [1, D]``: slots are its ``k`` choices, then the shared experts
    (``w1[ER:]``...), each with its weights read once by row blocks; the norm and the residual add in
    the two launches."""
    import triton

    global _ONE_KERNELS
    if _ONE_KERNELS is None:
        _ONE_KERNELS = _single_token_kernels()
    gate_up, down = _ONE_KERNELS
    D, I, K = x.shape[1], w1[0].shape[0], indices.shape[1]
    J = K + len(w1) - ER
    x = x.contiguous()
    idx = _index_tensor(indices)
    # the kernel reads any float dtype of combine weights (a cast would be one more launch)
    cw = weights.contiguous() if weights.dtype in (torch.float32, torch.bfloat16, torch.float16) else weights.float()
    h = torch.empty(J, I, device=x.device, dtype=x.dtype)
    gu, dn = TILES["gate_up_one"], TILES["down_one"]
    launch = pdl_launch(x.device, "moe_gate_up_one")
    early = x_ready and launch["PDL"] and J > K and EARLY_SHARED_EXPERTS  # shared slots before the wait
    (t1, a1), (t3, a3), (t2, a2) = _pointer_table(w1, x), _pointer_table(w3, x), _pointer_table(w2, x)
    nw = norm_weight.contiguous() if norm_weight is not None else x  # x stands in for an unread pointer
    gate_up[(J, triton.cdiv(I, gu["BLOCK_R"]))](
        x, idx, t1, t3, h, nw, D, I, K, ER, float(eps),
        BLOCK_R=gu["BLOCK_R"], BLOCK_D=gu["BLOCK_D"], EVEN_D=D % gu["BLOCK_D"] == 0, W_ALIGN=min(a1, a3),
        NORM=norm_weight is not None, num_warps=gu["num_warps"], EARLY=early, X_CACHE=".cg" if early else "",
        **launch)
    y = torch.empty(1, D, device=x.device, dtype=x.dtype)
    res = residual.contiguous() if residual is not None else y
    down[(triton.cdiv(D, dn["BLOCK_R"]),)](
        h, idx, cw, t2, y, res, D, I, K, ER,
        J=J, BLOCK_R=dn["BLOCK_R"], BLOCK_I=dn["BLOCK_I"], W_ALIGN=a2, RESIDUAL=residual is not None,
        num_warps=dn["num_warps"], **pdl_launch(x.device, "moe_down_one"))
    return y
