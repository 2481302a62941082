"""Triton inference kernel for :func:`kimi_linear.ops.moe.route` without expert groups (imported lazily).

One launch per MoE layer turns router logits (or the hidden states and the router weight, computing the
logits in the same program) into the chosen experts and their weights: sigmoid,
score-correction bias, top-k (k rounds of argmax with the winner masked out), gather of the
uncorrected scores, renormalisation and scaling. PyTorch needs ~7 launches for the same (sigmoid, add,
topk, gather, sum, divide, multiply), which a batch-1 decode step pays in every MoE layer.

Launch grid: ``(N,)``, one program per token; from the hidden states ``(N, S)``: S programs per token
each reading a slice of the router weight, the last to finish routes (``_route_split_kernel``).

The split router can also take the un-normalised hidden state and an RMSNorm weight (the batch-1
decode step's post-attention norm, folded): each program multiplies its slice of x by the norm weight
and stores its slice's sum of ``x^2`` next to its partial logits; the last one scales the summed logits
by ``rstd = rsqrt(mean(x^2) + eps)`` -- the logits are linear in x, so
``(x * rstd * w) . W = rstd * ((x * w) . W)``. The one-program kernel gets an already normalised x.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kimi_linear.ops.norm import rms_norm
from kimi_linear.ops.pdl import pdl_launch
from kimi_linear.ops.pdl_kernel import wait_for_previous_grid


@triton.jit
def _choose(b_l, bias, weights, indices, i_n, E, scaling, EP: tl.constexpr, TOPK: tl.constexpr,
            KP: tl.constexpr, HAS_BIAS: tl.constexpr, RENORM: tl.constexpr):
    """Token i_n's routing from its fp32 logits ``b_l [EP]``: sigmoid, correction bias, top-k by k
    rounds of argmax, uncorrected scores renormalised and scaled, stored as (weights, indices)."""
    o_e = tl.arange(0, EP)
    o_k = tl.arange(0, KP)
    m_e = o_e < E
    b_s = tl.sigmoid(b_l)
    b_c = b_s
    if HAS_BIAS:
        b_c = b_s + tl.load(bias + o_e, mask=m_e, other=0).to(tl.float32)
    b_c = tl.where(m_e, b_c, float("-inf"))
    b_w = tl.zeros([KP], dtype=tl.float32)
    b_i = tl.zeros([KP], dtype=tl.int64)
    for i in tl.static_range(TOPK):
        j = tl.argmax(b_c, axis=0)
        b_w = tl.where(o_k == i, tl.sum(tl.where(o_e == j, b_s, 0.0), axis=0), b_w)
        b_i = tl.where(o_k == i, j.to(tl.int64), b_i)
        b_c = tl.where(o_e == j, float("-inf"), b_c)
    if RENORM:
        b_w = b_w / (tl.sum(b_w, axis=0) + 1e-20)
    m_k = o_k < TOPK
    tl.store(weights + i_n * TOPK + o_k, b_w * scaling, mask=m_k)
    tl.store(indices + i_n * TOPK + o_k, b_i, mask=m_k)


@triton.jit
def _route_kernel(logits, x, w_gate, bias, weights, indices, E, D, scaling,
                  EP: tl.constexpr, TOPK: tl.constexpr, KP: tl.constexpr, HAS_BIAS: tl.constexpr,
                  RENORM: tl.constexpr, FROM_HIDDEN: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr, TRIGGER: tl.constexpr = True):
    wait_for_previous_grid(PDL, TRIGGER)  # programmatic dependent launch (ops/pdl.py)
    i_n = tl.program_id(0).to(tl.int64)
    o_e = tl.arange(0, EP)
    m_e = o_e < E
    if FROM_HIDDEN:  # the router's matrix-vector product too: logits = x . w_gate^T in fp32
        b_l = tl.zeros([EP], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            o_d = d0 + tl.arange(0, BLOCK_D)
            m_d = o_d < D
            b_x = tl.load(x + i_n * D + o_d, mask=m_d, other=0).to(tl.float32)
            b_w = tl.load(w_gate + o_e[:, None] * D + o_d[None, :], mask=m_e[:, None] & m_d[None, :], other=0)
            b_l += tl.sum(b_w.to(tl.float32) * b_x[None, :], 1)
    else:
        b_l = tl.load(logits + i_n * E + o_e, mask=m_e, other=0).to(tl.float32)
    _choose(b_l, bias, weights, indices, i_n, E, scaling, EP, TOPK, KP, HAS_BIAS, RENORM)


@triton.jit
def _route_split_kernel(x, w_gate, bias, partial, counter, weights, indices, norm_w, sumsq, E, D, scaling, eps,
                        EP: tl.constexpr, TOPK: tl.constexpr, KP: tl.constexpr, HAS_BIAS: tl.constexpr,
                        RENORM: tl.constexpr, BLOCK_D: tl.constexpr, NSPLIT: tl.constexpr, SP: tl.constexpr,
                        NORM: tl.constexpr, PDL: tl.constexpr, TRIGGER: tl.constexpr = True):
    # The router's logits split over NSPLIT programs per token, each reading one [EP, BLOCK_D] slice of
    # the router weight (one program reading all of it was the latency of the whole read, 9.5 us per
    # layer in the model). Each stores its partial logits; the token's counter (atomic, acq_rel) names
    # the program that finishes last, which sums the partials in slice order (deterministic: the same
    # experts every run, unlike atomic float adds), routes, and resets the counter for the next call.
    # NORM: x is un-normalised; each program also stores its slice's sum of x^2 (sumsq), and the last
    # scales the summed logits of x * norm_w by the row's rstd (module docstring).
    wait_for_previous_grid(PDL, TRIGGER)  # ops/pdl.py
    i_n = tl.program_id(0).to(tl.int64)
    i_p = tl.program_id(1)
    o_e = tl.arange(0, EP)
    m_e = o_e < E
    o_d = i_p * BLOCK_D + tl.arange(0, BLOCK_D)
    m_d = o_d < D
    b_x = tl.load(x + i_n * D + o_d, mask=m_d, other=0).to(tl.float32)
    if NORM:
        tl.store(sumsq + i_n * NSPLIT + i_p, tl.sum(b_x * b_x, axis=0))
        b_x = b_x * tl.load(norm_w + o_d, mask=m_d, other=0).to(tl.float32)
    b_w = tl.load(w_gate + o_e[:, None] * D + o_d[None, :], mask=m_e[:, None] & m_d[None, :], other=0)
    tl.store(partial + (i_n * NSPLIT + i_p) * EP + o_e, tl.sum(b_w.to(tl.float32) * b_x[None, :], 1))
    done = tl.atomic_add(counter + i_n, 1, sem="acq_rel")
    if done == NSPLIT - 1:
        o_p = tl.arange(0, SP)
        # L2 reads (".cg"): the other programs' partials never passed through this SM's L1
        b_part = tl.load(partial + (i_n * NSPLIT + o_p[:, None]) * EP + o_e[None, :], mask=(o_p < NSPLIT)[:, None],
                         other=0, cache_modifier=".cg")
        b_l = tl.sum(b_part, axis=0)
        if NORM:  # the slices' sums of x^2, in slice order too
            b_sq = tl.load(sumsq + i_n * NSPLIT + o_p, mask=o_p < NSPLIT, other=0, cache_modifier=".cg")
            b_l = b_l * tl.rsqrt(tl.sum(b_sq, axis=0) / D + eps)
        _choose(b_l, bias, weights, indices, i_n, E, scaling, EP, TOPK, KP, HAS_BIAS, RENORM)
        tl.atomic_xchg(counter + i_n, 0)


# The router's product from the hidden state is one program per token: wide slices keep more of
# the router weight's loads in flight. H100, E=16, D=2304, one token (benchmarks/decode_gemv_sweep.py
# --only route, results/decode/session6/gemv_sweep2_h100.log): 2048-wide slices on 8 warps 6.6 us,
# 128-wide on 4 warps ~17 us in the model, cuBLAS fp32 logits + the routing kernel 10.8 us.
HIDDEN_TILE = dict(BLOCK_D=2048, num_warps=8)
# A program holds an [EP, BLOCK_D] slice of the router weight: 16 x 2048 compiles to 221 registers
# without spills on sm_90a, 256 x 2048 to 30 KB of spills (benchmarks/kernel_resources.py), so the
# slice narrows as the experts grow.
HIDDEN_TILE_ELEMS = 16 * 2048


def hidden_block_d(E: int, D: int) -> int:
    """Width of the router-weight slice per step of the in-kernel logits for E experts, D features."""
    EP = triton.next_power_of_2(E)
    return max(16, min(HIDDEN_TILE["BLOCK_D"], HIDDEN_TILE_ELEMS // EP, triton.next_power_of_2(max(D, 1))))


# The split router (``_route_split_kernel``): slices of SPLIT_D features, at most SPLIT_MAX programs
# per token; 0 turns it off (one program per token, ``_route_kernel``). H100, E=16, D=2304, one token:
# 9 x 256 on 4 warps 4.2 us, 5 x 512 5.3, one program 6.6; in the model 250.7 -> 120.7 us per step, the
# graph-replayed 4K step 3.676 -> 3.548 ms (results/decode/session9/).
SPLIT_D = 256
SPLIT_MAX = 16
SPLIT_WARPS = 4
# the largest call the split router's workspace serves (the in-kernel router's own limits)
SCRATCH_TOKENS, SCRATCH_EXPERTS = 64, 32


def split_plan(E: int, D: int) -> tuple[int, int]:
    """(slice width, slices per token) of the split router for E experts, D features; (0, 0) when off."""
    if SPLIT_D <= 0:
        return 0, 0
    EP = triton.next_power_of_2(E)
    block = max(triton.next_power_of_2(SPLIT_D), triton.next_power_of_2(triton.cdiv(D, SPLIT_MAX)))
    block = min(block, max(16, HIDDEN_TILE_ELEMS // EP))
    return block, triton.cdiv(D, block)


class RouterScratch:
    """The split router's workspace for one call site (one MoE layer): partial logits, the slices' sums
    of squares (folded norm) and per-token counters that start at zero and that the kernel leaves at
    zero. One per layer, so two layers never share counters; a layer's calls run in order on its stream.
    Allocated once per device at the largest size it serves (132 KB), outside graph capture, and never
    replaced: a captured graph keeps using it."""

    def __init__(self) -> None:
        self.partial: torch.Tensor | None = None
        self.sumsq: torch.Tensor | None = None
        self.counter: torch.Tensor | None = None

    def get(self, dev: torch.device, N: int, NSPLIT: int,
            EP: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(partial fp32, counter int32 zeros, sumsq fp32) on ``dev`` for N tokens of NSPLIT slices of EP
        logits, or None
        (the caller then takes the one-program kernel) for a call larger than the workspace, or while a
        CUDA graph is being captured and it does not exist yet (a zero fill captured into the graph would
        not run before the eager calls after it)."""
        if N > SCRATCH_TOKENS or NSPLIT > SPLIT_MAX or EP > SCRATCH_EXPERTS:
            return None
        if self.partial is None or self.partial.device != dev:
            if dev.type == "cuda" and torch.cuda.is_current_stream_capturing():
                return None
            self.partial = torch.empty(SCRATCH_TOKENS * SPLIT_MAX * SCRATCH_EXPERTS, dtype=torch.float32, device=dev)
            self.sumsq = torch.empty(SCRATCH_TOKENS * SPLIT_MAX, dtype=torch.float32, device=dev)
            self.counter = torch.zeros(SCRATCH_TOKENS, dtype=torch.int32, device=dev)
        return self.partial, self.counter, self.sumsq


def route_triton(logits: torch.Tensor | None, correction_bias: torch.Tensor | None, top_k: int, renormalize: bool,
                 scaling: float, *, hidden: tuple[torch.Tensor, torch.Tensor] | None = None,
                 scratch: RouterScratch | None = None, norm_weight: torch.Tensor | None = None,
                 eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """``logits [N, E]`` -> ``(weights [N, k] fp32, indices [N, k] int64)``, unsorted slots.

    ``hidden = (x [N, D], w_gate [E, D])`` instead of logits: the kernel computes the logits too
    (fp32 sums), which saves the router's matrix-vector product and its casts at decode time; with a
    ``scratch`` (one per call site) the product is split over several programs per token.
    ``norm_weight [D]`` (with ``hidden``): route ``rms_norm(x, norm_weight, eps)``, folded into the split
    router's programs (module docstring), else normalised first."""
    if scratch is not None and not isinstance(scratch, RouterScratch):
        raise TypeError(f"scratch must be a moe_route_kernel.RouterScratch or None, got {type(scratch).__name__}")
    if norm_weight is not None and hidden is None:
        raise ValueError("norm_weight needs the hidden states (hidden=(x, w_gate)), not logits")
    if hidden is not None:
        x, w_gate = (t.contiguous() for t in hidden)
        (N, D), E = x.shape, w_gate.shape[0]
        dev = x.device
    else:
        logits = logits.contiguous()
        (N, E), D = logits.shape, 0
        dev = logits.device
    weights = torch.empty(N, top_k, dtype=torch.float32, device=dev)
    indices = torch.empty(N, top_k, dtype=torch.int64, device=dev)
    if N > 0 and hidden is not None:
        block, nsplit = split_plan(E, D)
        bufs = scratch.get(dev, N, nsplit, triton.next_power_of_2(E)) if scratch is not None and nsplit > 1 else None
        if bufs is not None:
            bias = correction_bias.contiguous() if correction_bias is not None else weights
            nw = norm_weight.contiguous() if norm_weight is not None else x  # x: an unread stand-in
            _route_split_kernel[(N, nsplit)](
                x, w_gate, bias, bufs[0], bufs[1], weights, indices, nw, bufs[2], E, D, float(scaling), float(eps),
                EP=triton.next_power_of_2(E), TOPK=top_k, KP=triton.next_power_of_2(top_k),
                HAS_BIAS=correction_bias is not None, RENORM=renormalize, BLOCK_D=block, NSPLIT=nsplit,
                SP=triton.next_power_of_2(nsplit), NORM=norm_weight is not None, num_warps=SPLIT_WARPS,
                **pdl_launch(dev, "route_split"))
            return weights, indices
        if norm_weight is not None:  # the one-program kernel reads a normalised x
            x = rms_norm(x, norm_weight, eps).contiguous()
    if N > 0:
        bias = correction_bias.contiguous() if correction_bias is not None else weights
        any_t = weights  # stands in for the pointers the chosen form does not read
        _route_kernel[(N,)](any_t if hidden else logits, x if hidden else any_t, w_gate if hidden else any_t,
                            bias, weights, indices, E, D, float(scaling), EP=triton.next_power_of_2(E),
                            TOPK=top_k, KP=triton.next_power_of_2(top_k), HAS_BIAS=correction_bias is not None,
                            RENORM=renormalize, FROM_HIDDEN=hidden is not None,
                            BLOCK_D=hidden_block_d(E, D),
                            num_warps=HIDDEN_TILE["num_warps"] if hidden is not None else (4 if E > 256 else 1),
                            **pdl_launch(dev, "route"))
    return weights, indices
