"""The one-token (batch-1 decoding) MoE kernels of :mod:`kimi_linear.ops.moe_decode`; imported lazily
(needs Triton).

A token's "slots" are its ``K`` chosen experts, then the shared ones (weight 1). Two forms, the same
arithmetic (each row block computed by the same helper, so the two agree to the bit):

* two launches: ``gate_up_one_kernel`` (grid ``[J, I / BLOCK_R]``: SwiGLU rows of every slot into
  ``h [J, I]``), then ``down_one_kernel`` (grid ``[D / BLOCK_R]``: output rows, every slot's down
  projection summed with its combine weight, the residual added);
* one persistent launch, ``moe_one_persistent_kernel``: ``NPROG`` programs, all resident at once, walk
  the gate/up row blocks, count themselves in on a device counter, and walk the down rows once every
  program has counted in. Between the two products there is no grid boundary: a program that is done
  with its gate/up blocks asks the L2 for its first down rows (Hopper bulk prefetch, ``DN_PREFETCH``)
  while the last gate/up blocks still stream, so the weights' stream does not stop and restart
  (docs/decode.md, session 30: why a kernel boundary costs a streaming step its ramp and tail).

The workspace ``sync`` (int32, zero between calls, :func:`sync_words` long) holds a count and one flag per
program, each in its own 128-byte line: the last program to count in zeroes the count and raises every
flag; each program waits on its own flag and lowers it, so the next call finds it all zero. ``PHASES`` (3 = both) lets the interpreter, which runs programs one after
another and so cannot wait for a later one, test each phase's walk with several programs (1, then 2).
"""

from __future__ import annotations

import triton
import triton.language as tl

from kimi_linear.ops.pdl_kernel import wait_for_previous_grid
from kimi_linear.ops.prefetch_kernel import bulk_prefetch_l2


def sync_words(nprog: int) -> int:
    """int32 words of the persistent kernel's workspace for ``nprog`` programs: the count's line, then
    one line per program's flag."""
    return (nprog + 1) * FLAG_STRIDE.value


@triton.jit
def _slot_expert(idx_ptr, j, K, ER):
    """Expert of slot ``j``: the token's ``j``-th choice for ``j < K``, else shared expert ``j - K``
    (stored after the ``ER`` routed ones in the weight tables)."""
    return tl.where(j < K, tl.load(idx_ptr + tl.minimum(j, K - 1)), ER + j - K)


@triton.jit
def _gate_up_rows(x_ptr, idx_ptr, w1_tab, w3_tab, h_ptr, nw_ptr, j, rb, D, I, K, ER, eps,
                  BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, W_ALIGN: tl.constexpr,
                  NORM: tl.constexpr, X_CACHE: tl.constexpr):
    """``h[j, rows] = silu(w1_e x) * (w3_e x)`` for row block ``rb`` of slot ``j`` (``BLOCK_R`` rows of
    ``I``). ``W_ALIGN``: the experts' address alignment in bytes (an address read from a table is of
    unknown alignment otherwise). ``NORM``: x is un-normalised; the sums are of ``x * nw``, scaled by
    ``rstd`` before the SwiGLU (a product is linear in its input). ``X_CACHE`` ".cg": x read from L2."""
    e = _slot_expert(idx_ptr, j, K, ER)
    w1 = tl.multiple_of(tl.load(w1_tab + e).to(tl.pointer_type(x_ptr.dtype.element_ty)), W_ALIGN)
    w3 = tl.multiple_of(tl.load(w3_tab + e).to(tl.pointer_type(x_ptr.dtype.element_ty)), W_ALIGN)
    o_r = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    m_r = o_r < I
    acc1 = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc3 = tl.zeros([BLOCK_R], dtype=tl.float32)
    b_ss = 0.0  # NORM: sum of x^2 (a scalar: a [BLOCK_D] accumulator cost registers, hence occupancy)
    for d0 in range(0, D, BLOCK_D):
        o_d = d0 + tl.arange(0, BLOCK_D)
        m = m_r[:, None] & ((o_d[None, :] < D) | EVEN_D)
        b_x = tl.load(x_ptr + o_d, mask=(o_d < D) | EVEN_D, other=0.0, cache_modifier=X_CACHE).to(tl.float32)
        if NORM:
            b_ss += tl.sum(b_x * b_x, 0)
            b_x = b_x * tl.load(nw_ptr + o_d, mask=(o_d < D) | EVEN_D, other=0.0).to(tl.float32)
        p_w = o_r[:, None].to(tl.int64) * D + o_d[None, :]
        acc1 += tl.sum(tl.load(w1 + p_w, mask=m, other=0.0).to(tl.float32) * b_x[None, :], 1)
        acc3 += tl.sum(tl.load(w3 + p_w, mask=m, other=0.0).to(tl.float32) * b_x[None, :], 1)
    if NORM:
        rstd = tl.rsqrt(b_ss / D + eps)
        acc1 *= rstd
        acc3 *= rstd
    h = acc1 * tl.sigmoid(acc1) * acc3
    tl.store(h_ptr + j * I + o_r, h.to(h_ptr.dtype.element_ty), mask=m_r)


@triton.jit
def _down_rows(h_ptr, idx_ptr, cw_ptr, w2_tab, y_ptr, res_ptr, rb, D, I, K, ER,
               J: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr, W_ALIGN: tl.constexpr,
               RESIDUAL: tl.constexpr, H_CACHE: tl.constexpr):
    """``y[rows] = sum_j c_j w2_e(j)[rows, :] . h_j`` for row block ``rb`` (``BLOCK_R`` rows of ``D``);
    the slot loop unrolled at compile time (``J`` is fixed per model) so every slot's loads can be in
    flight. ``RESIDUAL``: ``y = res + (that sum rounded to y's dtype)``, added in fp32 as the separate
    add would. ``H_CACHE`` ".cg": h read from L2 (written by other programs of the same grid)."""
    o_r = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    m_r = o_r < D
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    for j in tl.static_range(J):
        e = _slot_expert(idx_ptr, j, K, ER)
        c = tl.where(j < K, tl.load(cw_ptr + tl.minimum(j, K - 1)).to(tl.float32), 1.0)  # shared: weight 1
        w2 = tl.multiple_of(tl.load(w2_tab + e).to(tl.pointer_type(h_ptr.dtype.element_ty)), W_ALIGN)
        part = tl.zeros([BLOCK_R], dtype=tl.float32)
        for i0 in range(0, I, BLOCK_I):
            o_i = i0 + tl.arange(0, BLOCK_I)
            m_i = o_i < I
            b_h = tl.load(h_ptr + j * I + o_i, mask=m_i, other=0.0, cache_modifier=H_CACHE).to(tl.float32)
            b_w = tl.load(w2 + o_r[:, None].to(tl.int64) * I + o_i[None, :], mask=m_r[:, None] & m_i[None, :], other=0.0)
            part += tl.sum(b_w.to(tl.float32) * b_h[None, :], 1)
        acc += c * part
    if RESIDUAL:
        acc = acc.to(y_ptr.dtype.element_ty).to(tl.float32) + tl.load(res_ptr + o_r, mask=m_r, other=0.0).to(tl.float32)
    tl.store(y_ptr + o_r, acc.to(y_ptr.dtype.element_ty), mask=m_r)


@triton.jit
def gate_up_one_kernel(x_ptr, idx_ptr, w1_tab, w3_tab, h_ptr, nw_ptr, D, I, K, ER, eps,
                       BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
                       W_ALIGN: tl.constexpr, NORM: tl.constexpr, PDL: tl.constexpr,
                       EARLY: tl.constexpr, X_CACHE: tl.constexpr, TRIGGER: tl.constexpr = True):
    """Program ``(j, rb)``: :func:`_gate_up_rows`. EARLY (PDL, x written before the previous kernel, the
    router): the shared slots' programs need no routing and run before the wait, beside the router; they
    wait at the end, so that this grid still completes after the router (ops/pdl.py)."""
    j = tl.program_id(0)
    if EARLY:
        if j < K:
            wait_for_previous_grid(PDL, TRIGGER)
    else:
        wait_for_previous_grid(PDL, TRIGGER)  # ops/pdl.py
    _gate_up_rows(x_ptr, idx_ptr, w1_tab, w3_tab, h_ptr, nw_ptr, j, tl.program_id(1), D, I, K, ER, eps,
                  BLOCK_R, BLOCK_D, EVEN_D, W_ALIGN, NORM, X_CACHE)
    if EARLY:
        if j >= K:
            wait_for_previous_grid(PDL, TRIGGER)


@triton.jit
def down_one_kernel(h_ptr, idx_ptr, cw_ptr, w2_tab, y_ptr, res_ptr, D, I, K, ER,
                    J: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr, W_ALIGN: tl.constexpr,
                    RESIDUAL: tl.constexpr, PDL: tl.constexpr, TRIGGER: tl.constexpr = True):
    """Program ``rb``: :func:`_down_rows`."""
    wait_for_previous_grid(PDL, TRIGGER)
    _down_rows(h_ptr, idx_ptr, cw_ptr, w2_tab, y_ptr, res_ptr, tl.program_id(0), D, I, K, ER,
               J, BLOCK_R, BLOCK_I, W_ALIGN, RESIDUAL, "")


@triton.jit
def _prefetch_down_rows(idx_ptr, w2_tab, rb, D, I, K, ER, J: tl.constexpr, JP: tl.constexpr,
                        BLOCK_R: tl.constexpr, ELT: tl.constexpr):
    """Ask the L2 for row block ``rb`` of every slot's down projection: one bulk prefetch per slot of
    ``BLOCK_R`` contiguous rows of ``I`` elements (``ELT`` bytes each; 16-byte aligned, host-checked);
    ``JP``: ``J`` rounded up to a power of two."""
    j = tl.arange(0, JP)
    e = tl.where(j < K, tl.load(idx_ptr + tl.minimum(j, K - 1)), ER + j - K)
    base = tl.load(w2_tab + e, mask=j < J, other=0)
    rows = tl.minimum(D - rb * BLOCK_R, BLOCK_R)
    size = tl.where(j < J, rows * I * ELT, 0).to(tl.int32)
    bulk_prefetch_l2(base + (rb * BLOCK_R).to(tl.int64) * I * ELT, size)


@triton.jit
def _trap(x):
    """End the kernel with an error (``trap``): a launch fault the host sees, instead of a hang."""
    tl.inline_asm_elementwise("trap; mov.u32 $0, 0;", "=r,r", [x], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _fence_acq_rel(x):
    """``fence.acq_rel.gpu``: this thread's earlier accesses (and those it acquired) are ordered before its
    later writes, for any thread at GPU scope that acquires them."""
    tl.inline_asm_elementwise("fence.acq_rel.gpu; mov.u32 $0, 0;", "=r,r", [x], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _nanosleep(x, NS: tl.constexpr):
    """Suspend the warp for about ``NS`` nanoseconds (``nanosleep``; sm_70 and later, not the interpreter)."""
    tl.inline_asm_elementwise("nanosleep.u32 $1; mov.u32 $0, 0;", "=r,r", [x * 0 + NS], dtype=tl.int32,
                              is_pure=False, pack=1)


FLAG_STRIDE = tl.constexpr(32)  # int32s between two programs' flags: one 128-byte line each
FLAG_BLOCK = tl.constexpr(128)  # flags the last program raises per step of its loop
SPIN_LIMIT = tl.constexpr(1 << 24)  # polls of the counter (~0.5 us each: seconds) before a program gives up and traps


@triton.jit(do_not_specialize=["NPROG"])
def moe_one_persistent_kernel(x_ptr, idx_ptr, cw_ptr, w1_tab, w3_tab, w2_tab, h_ptr, y_ptr, res_ptr, nw_ptr, sync_ptr,
                              D, I, K, ER, eps, NPROG,
                              J: tl.constexpr, GU_R: tl.constexpr, GU_D: tl.constexpr, EVEN_D: tl.constexpr,
                              DN_R: tl.constexpr, DN_I: tl.constexpr, W_ALIGN: tl.constexpr,
                              W2_ALIGN: tl.constexpr, NORM: tl.constexpr, RESIDUAL: tl.constexpr,
                              EARLY: tl.constexpr, DN_PREFETCH: tl.constexpr, JP: tl.constexpr, ELT: tl.constexpr,
                              PHASES: tl.constexpr, ON_GPU: tl.constexpr, SLEEP_NS: tl.constexpr, PDL: tl.constexpr,
                              TRIGGER: tl.constexpr = True):
    """Both products in one grid of ``NPROG`` programs (module docstring). Gate/up row blocks are
    numbered shared slots first, so that with ``EARLY`` (as in :func:`gate_up_one_kernel`) a program
    walks its shared blocks before its PDL wait and its routed ones after it; block ``u`` goes to
    program ``u mod NPROG``, and so do the down rows. Every program must be resident at once (the host
    sizes ``NPROG`` from the compiled kernel's occupancy): the down phase waits for all of them, and a
    program that has waited ``SPIN_LIMIT`` polls traps: a GPU that could not hold them all faults rather
    than hangs. ``ON_GPU`` (not the interpreter): the trap, the fence and the pause are inline PTX. ``NPROG`` is not specialised on, so the host can
    compile once and size the grid from the result."""
    pid = tl.program_id(0)
    n_gu = tl.cdiv(I, GU_R)
    n_shared = (J - K) * n_gu  # blocks of the shared slots, numbered first
    if not EARLY:
        wait_for_previous_grid(PDL, TRIGGER)
    if PHASES % 2 == 1:
        for u in range(pid, n_shared, NPROG):
            _gate_up_rows(x_ptr, idx_ptr, w1_tab, w3_tab, h_ptr, nw_ptr, K + u // n_gu, u % n_gu, D, I, K, ER, eps,
                          GU_R, GU_D, EVEN_D, W_ALIGN, NORM, ".cg" if EARLY else "")
    if EARLY:
        wait_for_previous_grid(PDL, TRIGGER)
    if PHASES % 2 == 1:
        # this program's first routed block: the first u >= n_shared with u = pid (mod NPROG)
        first = pid + tl.cdiv(tl.maximum(n_shared - pid, 0), NPROG) * NPROG
        for u in range(first, J * n_gu, NPROG):
            v = u - n_shared
            _gate_up_rows(x_ptr, idx_ptr, w1_tab, w3_tab, h_ptr, nw_ptr, v // n_gu, v % n_gu, D, I, K, ER, eps,
                          GU_R, GU_D, EVEN_D, W_ALIGN, NORM, "")
    if PHASES == 3:
        if DN_PREFETCH:
            if pid * DN_R < D:  # the weights of this program's first down rows, while others finish gate/up
                _prefetch_down_rows(idx_ptr, w2_tab, pid, D, I, K, ER, J, JP, DN_R, ELT)
        tl.debug_barrier()  # every thread's h stores precede the count (release, gpu scope)
        if tl.atomic_add(sync_ptr, 1, sem="acq_rel") == NPROG - 1:
            # the last to count in has acquired every program's release: it zeroes the count for the next
            # call and raises every program's flag with release, one 128-byte line each, so that the
            # waiting programs poll lines all over the L2 instead of one (one line, read by every program
            # while the last blocks stream, slowed the stream itself: session 30)
            tl.atomic_xchg(sync_ptr, 0)
            o_f = tl.arange(0, FLAG_BLOCK)
            if ON_GPU:  # one fence, then relaxed flags (a release on every flag would fence each of them)
                _fence_acq_rel(o_f)
            for f0 in range(0, NPROG, FLAG_BLOCK):
                p_f = f0 + o_f
                tl.atomic_xchg(sync_ptr + (p_f + 1) * FLAG_STRIDE, tl.full([FLAG_BLOCK], 1, tl.int32),
                               mask=p_f < NPROG, sem="relaxed" if ON_GPU else "release")
        flag = sync_ptr + (pid + 1) * FLAG_STRIDE
        seen = tl.load(flag, volatile=True)
        polls = 0
        while (seen == 0) & (polls < SPIN_LIMIT):
            if SLEEP_NS > 0:
                _nanosleep(seen, SLEEP_NS)
            seen = tl.load(flag, volatile=True)
            polls += 1
        # acquire (the flag's release carries every program's h stores) and lower the flag for the next call
        seen = tl.atomic_xchg(flag, 0, sem="acquire")
        if ON_GPU:
            if seen == 0:
                _trap(seen)
    if PHASES >= 2:
        # h through L1 like any load: the acquire above orders these loads after every program's stores
        # (PTX memory model; the hardware's acquire drops this SM's stale L1 lines), and the SM's programs
        # then share its lines instead of each reading all of h from L2. PHASES 2 alone follows a launch.
        for rb in range(pid, tl.cdiv(D, DN_R), NPROG):
            _down_rows(h_ptr, idx_ptr, cw_ptr, w2_tab, y_ptr, res_ptr, rb, D, I, K, ER,
                       J, DN_R, DN_I, W2_ALIGN, RESIDUAL, "")
