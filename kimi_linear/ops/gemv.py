"""Several linear layers that share one input, for a few tokens, in one launch (decoding).

At batch 1 a decode step is a chain of matrix-vector products, each bound by reading its weight
once. cuBLAS reaches ~2.7 TB/s on an H100 for the large ones, but a KDA layer also has small ones
(the gate's and output gate's low-rank ``a`` projections, ``b_proj``: 0.6 MB or less) that cost a
launch and ~5 us each whatever their size. :func:`fused_linear` reads every weight of a list once in
a single launch and writes the outputs side by side in one buffer, as if the weights had been
concatenated, without copying them (the checkpoint keeps separate tensors; a concatenated copy would
double their memory).

| tensor  | shape                | notes                                                    |
|---------|----------------------|----------------------------------------------------------|
| x       | ``[N, D]``           | the shared input, N <= :data:`MAX_TOKENS` on the kernel  |
|         | or a list of them    | one input per weight (below)                             |
| weights | list of ``[R_i, D]`` | ``nn.Linear`` layout, x's dtype and device, contiguous   |
| return  | list of ``[N, R_i]`` | x's dtype; on the kernel, column slices of one buffer    |

The kernel: the rows of all weights are cut into blocks of ``BLOCK_R`` rows (a block never spans
two weights); program ``p`` reads its block's ``[BLOCK_R, D]`` rows in ``BLOCK_D`` slices and
accumulates their dot products with the ``N`` token rows in fp32. A host-built table, made once per
weight set, gives each program its weight's address, first row, row count, output column and weight
index.

``x`` may also be a list with one ``[N, D]`` input per weight (the KDA decode step's two low-rank
up-projections, whose inputs are different column slices of one earlier output): the kernel reads
input ``i`` at its own offset, so the slices of one buffer need no copy (other inputs are first
concatenated into one buffer, one extra copy).

``conv_steps[i] = (window [N, R_i, W-1], conv_weight [R_i, W])`` runs output ``i`` through one step of
the causal depthwise short conv + SiLU in the same program (KDA's q, k, v): the projection is rounded
to x's dtype as a separate ``F.linear`` would be, then convolved in fp32 with the cached window, which
is shifted in place -- the arithmetic of :func:`kimi_linear.ops.conv.causal_conv1d_update_`'s kernel.

Two epilogues serve the batch-1 decode step, where they replace the residual add + RMSNorm launch
between sub-blocks (docs/decode.md):

* ``norm_weight [D]`` (single input only): ``x`` is the un-normalised hidden state and every weight
  multiplies ``rms_norm(x, norm_weight, eps)``. A product is linear in its input, so
  ``W @ (x * rstd * w) = rstd * (W @ (x * w))``: each program sums ``x^2`` per token row in the D loop
  it already runs, multiplies ``x`` by the norm weight as it loads it, and scales its fp32 sums by
  ``rstd = rsqrt(mean(x^2) + eps)`` before the conv step and the store. (The unfused norm rounds the
  normalised row to x's dtype; this form does not, so bf16 results differ in the last bits.)
* ``residual [N, OUT]`` (OUT: all weights' rows): the outputs are ``residual + y``, ``y`` rounded to
  x's dtype first and the sum formed in fp32 and rounded, the values of ``residual + y`` after the
  unfused product.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from kimi_linear.backends import resolve_backend
from kimi_linear.ops.conv import causal_conv1d_update_
from kimi_linear.ops.norm import rms_norm
from kimi_linear.ops.pdl import pdl_launch

__all__ = ["MAX_TOKENS", "TILES", "few_rows_linear", "fused_linear", "fused_linear_ref"]

# Measured on an H100 (bf16, hidden 2304; benchmarks/decode_gemv_sweep.py, results/decode/session6/
# gemv_sweep_h100.log), one-launch kernel against one cuBLAS call per weight, CUDA-graphed:
#   KDA layer's six input projections, N=1: 25.6 us vs 45.2 (floor 19.3); N=2: 32.0 vs 44.7; N=4: 55.1 vs 44.5
#   MLA layer's two, N=1: 11.9 vs 14.9 (floor 10.3); output projection 4096 -> 2304: 7.3 vs 8.5 (floor 6.3)
# Unrolling the D loop at compile time was faster in that sweep (gemv_unrolled_d_h100.txt: 24.5 / 26.2
# / 9.3 / 6.9 us, no conv steps there) but made the whole KDA layer step 61 -> 136 us in the model
# (session6/regressed/; cause not found: both forms compile to 40-64 registers without spills): kept
# as a runtime loop.
MAX_TOKENS = 2  # more tokens: one GEMM per weight (cuBLAS) is the better tool
# Launch settings by input width and row count: "narrow" (D <= 256: the gates' low-rank
# up-projections, 128 -> 4096; one D-wide slice per block), "wide_few" (D > 256, at most FEW_ROWS rows
# in all: an output projection's 2304, the MLA layer's 6720 inputs), "wide" (a KDA layer's 12,576 input
# rows). Session 6 tuned one "wide" tile on weights that stayed in the H100's 50 MB L2 between replays
# (gemv_sweep_h100.log), so its 7.3 us output projection was 11.1 us in the model, which reads every
# weight cold. Session 10 re-tuned on copies that keep each launch's weights out of L2 (results/decode/
# session10/gemv_sweep_cold_h100.txt; us per decode step of the benchmark model): "wide" (4, 512, 2) ->
# (4, 256, 1) 516 -> 493; "wide_few" split off with 2-row blocks (twice the programs) 415 -> 367
# (output projection 9.5 us, floor 6.3; MLA inputs 14.2, floor 10.3); "narrow" (8, 128, 1) -> (4, 128,
# 1) 112 -> 109 (1 MB: latency-bound, 2.7 us against a 0.3 us floor). Then the weights' loads were
# vectorised (W_ALIGN, in the kernel; before, an address read from the table was of unknown alignment
# and every weight element took its own load): "wide" 493 -> 437 us, "wide_few" 367 -> 346 with
# (2, 1024, 1) (gemv_sweep_aligned_h100.txt).
TILES: dict[str, dict[str, int]] = {
    "wide": dict(BLOCK_R=4, BLOCK_D=256, num_warps=1),
    "wide_few": dict(BLOCK_R=2, BLOCK_D=1024, num_warps=1),
    "narrow": dict(BLOCK_R=4, BLOCK_D=128, num_warps=1),
}
FEW_ROWS = 8192
# The folded norm (NORM: x times the norm weight, a row sum of squares) holds a second D-slice per
# thread: launch settings of its own where the plain ones lose occupancy; a class not listed takes
# TILES. H100, cold weights (benchmarks/decode_gemv_sweep.py --fold, results/decode/session11/
# gemv_sweep_fold_h100.txt): the MLA inputs with the norm took 17.6 us on "wide_few"'s (2, 1024, 1)
# (95 registers against 71 without the norm) and 13.7 us on (2, 512, 1), as without the norm (13.8);
# a KDA layer's inputs keep "wide"'s tile (22.2 us against 21.9 without the norm); the output
# projection's residual epilogue costs nothing measurable (9.3 us both).
NORM_TILES: dict[str, dict[str, int]] = {
    "wide_few": dict(BLOCK_R=2, BLOCK_D=512, num_warps=1),
}


def _tiles_class(D: int, rows: int) -> str:
    """The :data:`TILES` entry for input width ``D`` and ``rows`` weight rows in all."""
    return "narrow" if D <= 256 else "wide_few" if rows <= FEW_ROWS else "wide"


def _tiles(D: int, rows: int, norm: bool = False) -> dict[str, int]:
    cls = _tiles_class(D, rows)
    return NORM_TILES.get(cls, TILES[cls]) if norm else TILES[cls]

_TABLES: dict[tuple, tuple[torch.Tensor, int, int]] = {}
_CONV_TABLES: OrderedDict[tuple, torch.Tensor] = OrderedDict()  # per cache: bounded (LRU)
_CONV_TABLES_MAX = 1024


def fused_linear_ref(x: torch.Tensor | Sequence[torch.Tensor], weights: Sequence[torch.Tensor], conv_steps=None, *,
                     norm_weight: torch.Tensor | None = None, eps: float = 1e-6, residual: torch.Tensor | None = None,
                     backend: str = "reference") -> list[torch.Tensor]:
    """``[F.linear(x, w_0), F.linear(x, w_1), ...]`` (``x_i`` for ``w_i`` when ``x`` is a list; ``x``
    first through ``rms_norm(x, norm_weight, eps)`` when given; then the conv steps; then ``residual``'s
    column slices added): the definition the kernel is tested against. ``backend`` is the norm's and
    the conv steps' own. (Separate contiguous outputs: CPU GEMMs round a row differently depending on
    its alignment, so slices of one buffer would make results depend on a row's position in the batch.)"""
    if norm_weight is not None:
        x = rms_norm(x, norm_weight, eps, backend=backend)
    xs = [x] * len(weights) if isinstance(x, torch.Tensor) else list(x)
    outs = [F.linear(xi, w) for xi, w in zip(xs, weights, strict=True)]
    for i, step in enumerate(conv_steps or ()):
        if step is not None:
            window, conv_weight = step
            outs[i] = causal_conv1d_update_(outs[i], window, conv_weight.reshape(conv_weight.shape[0], 1, -1),
                                            activation="silu", backend=backend)
    if residual is not None:
        parts = residual.split([w.shape[0] for w in weights], dim=1)
        outs = [r + y for r, y in zip(parts, outs, strict=True)]
    return outs


def _check_epilogues(x: torch.Tensor | Sequence[torch.Tensor], weights: Sequence[torch.Tensor],
                     norm_weight: torch.Tensor | None, residual: torch.Tensor | None) -> None:
    """Validate the ``norm_weight`` and ``residual`` options (module docstring) against the checked
    input ``x`` and ``weights``."""
    x0 = x if isinstance(x, torch.Tensor) else x[0]
    N, D = x0.shape
    if norm_weight is not None:
        if not isinstance(x, torch.Tensor):
            raise ValueError("norm_weight needs one shared input tensor x, got a list of inputs (one per weight)")
        if not isinstance(norm_weight, torch.Tensor) or norm_weight.dim() != 1 or norm_weight.shape[0] != D:
            raise ValueError(f"norm_weight must be [D={D}], got "
                             f"{tuple(norm_weight.shape) if isinstance(norm_weight, torch.Tensor) else type(norm_weight).__name__}")
        if norm_weight.device != x0.device or not norm_weight.is_floating_point():
            raise ValueError(f"norm_weight must be a float tensor on x's device {x0.device}, "
                             f"got {norm_weight.dtype} on {norm_weight.device}")
    if residual is not None:
        out = sum(w.shape[0] for w in weights)
        if not isinstance(residual, torch.Tensor) or tuple(residual.shape) != (N, out):
            raise ValueError(f"residual must be [N={N}, OUT={out}] (all weights' rows), got "
                             f"{tuple(residual.shape) if isinstance(residual, torch.Tensor) else type(residual).__name__}")
        if residual.dtype != x0.dtype or residual.device != x0.device:
            raise ValueError(f"residual must be {x0.dtype} on {x0.device} (x's), got {residual.dtype} on {residual.device}")


def _check_conv_steps(x: torch.Tensor, weights: Sequence[torch.Tensor], conv_steps) -> int:
    """Validate ``conv_steps`` (see the module docstring); returns the common kernel width W (0: none)."""
    if len(conv_steps) != len(weights):
        raise ValueError(f"conv_steps must have one entry (or None) per weight: {len(weights)}, got {len(conv_steps)}")
    widths = set()
    for i, step in enumerate(conv_steps):
        if step is None:
            continue
        window, cw = step
        R = weights[i].shape[0]
        W = cw.shape[-1]
        if cw.numel() != R * W or tuple(window.shape) != (x.shape[0], R, W - 1):
            raise ValueError(f"conv step {i}: need window [N={x.shape[0]}, {R}, W-1] and conv weight [{R}, W], "
                             f"got {tuple(window.shape)} and {tuple(cw.shape)}")
        if window.device != x.device or cw.device != x.device:
            raise ValueError(f"conv step {i}: window and conv weight must be on {x.device}")
        widths.add(W)
    if len(widths) > 1:
        raise ValueError(f"conv steps must share one kernel width, got {sorted(widths)}")
    return widths.pop() if widths else 0


def _conv_table(conv_steps, device) -> torch.Tensor:
    """int64 ``[S, 2]`` = (window address, conv weight address) per weight, 0 where no conv; cached."""
    key = tuple((0, 0) if st is None else (st[0].data_ptr(), st[1].data_ptr()) for st in conv_steps)
    table = _CONV_TABLES.get(key)
    if table is None:
        table = torch.tensor(key, dtype=torch.int64, device=device)
        _CONV_TABLES[key] = table
        if len(_CONV_TABLES) > _CONV_TABLES_MAX:
            _CONV_TABLES.popitem(last=False)
    else:
        _CONV_TABLES.move_to_end(key)
    return table


def _check(x: torch.Tensor | Sequence[torch.Tensor], weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """Validate the input(s) and weights; returns the first input (shape, dtype and device of all)."""
    if len(weights) == 0:
        raise ValueError("need at least one weight")
    xs = [x] if isinstance(x, torch.Tensor) else list(x)
    if not isinstance(x, torch.Tensor) and len(xs) != len(weights):
        raise ValueError(f"need one input per weight: {len(weights)} weights, got {len(xs)} inputs")
    x0 = xs[0]
    for j, xi in enumerate(xs):
        if xi.dim() != 2:
            raise ValueError(f"x must be [N, D], got shape {tuple(xi.shape)}" + (f" (input {j})" if len(xs) > 1 else ""))
        if xi.shape != x0.shape or xi.dtype != x0.dtype or xi.device != x0.device:
            raise ValueError(f"inputs must share shape, dtype and device: input 0 is {tuple(x0.shape)} {x0.dtype} "
                             f"on {x0.device}, input {j} {tuple(xi.shape)} {xi.dtype} on {xi.device}")
    for i, w in enumerate(weights):
        if w.dim() != 2 or w.shape[1] != x0.shape[1]:
            raise ValueError(f"weight {i} must be [R, D={x0.shape[1]}], got shape {tuple(w.shape)}")
        if w.device != x0.device or w.dtype != x0.dtype:
            raise ValueError(f"weight {i} must be {x0.dtype} on {x0.device} (x's), got {w.dtype} on {w.device}")
    return x0


def _inputs_in_one_buffer(xs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, tuple[int, ...], int]:
    """``(base, offsets, row stride)`` such that input ``i`` is ``base``'s storage from element
    ``offsets[i]`` on with that row stride. Column slices of one buffer (same storage and row stride)
    are used in place; anything else is concatenated into one contiguous buffer first."""
    x0 = xs[0]
    same = all(xi.untyped_storage().data_ptr() == x0.untyped_storage().data_ptr() and xi.stride(1) == 1
               and (xi.shape[0] == 1 or xi.stride(0) == x0.stride(0)) for xi in xs)
    if same:
        base = min(xs, key=lambda xi: xi.storage_offset())
        return base, tuple(xi.storage_offset() - base.storage_offset() for xi in xs), base.stride(0)
    D = x0.shape[1]
    cat = torch.cat(list(xs), dim=1)
    return cat, tuple(i * D for i in range(len(xs))), cat.stride(0)


def _block_table(weights: Sequence[torch.Tensor], block_r: int,
                 x_offsets: tuple[int, ...]) -> tuple[torch.Tensor, int, int]:
    """int64 ``[P, 6]`` = (weight address, first row, rows of that weight, first output column, weight
    index, offset of the weight's input in elements) per program, the total width, and the weights'
    common address alignment in bytes (16, or 1 if any is not 16-byte aligned: the kernel's W_ALIGN).
    Cached per weight set (addresses + shapes), block size and input offsets."""
    key = (block_r, x_offsets, *((w.data_ptr(), *w.shape) for w in weights))
    hit = _TABLES.get(key)
    if hit is None:
        rows, col = [], 0
        for i, w in enumerate(weights):
            for r0 in range(0, w.shape[0], block_r):
                rows.append((w.data_ptr(), r0, w.shape[0], col, i, x_offsets[i]))
            col += w.shape[0]
        hit = (torch.tensor(rows, dtype=torch.int64, device=weights[0].device), col,
               16 if all(w.data_ptr() % 16 == 0 for w in weights) else 1)
        _TABLES[key] = hit
    return hit


def _kernel():
    import triton
    import triton.language as tl

    # a module global, not a closure variable: Triton's interpreter resolves a kernel's names there only
    global wait_for_previous_grid
    from kimi_linear.ops.pdl_kernel import wait_for_previous_grid

    @triton.jit
    def fused_linear_kernel(x_ptr, tab_ptr, conv_tab, y_ptr, nw_ptr, res_ptr, N, D, OUT, SX, eps,
                            NT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
                            CONV: tl.constexpr, W: tl.constexpr, WP: tl.constexpr,
                            MULTI_X: tl.constexpr, X_ALIGN: tl.constexpr, W_ALIGN: tl.constexpr,
                            NORM: tl.constexpr, RESIDUAL: tl.constexpr, PDL: tl.constexpr, TRIGGER: tl.constexpr = True):
        # NORM: x is un-normalised; the products are of x * nw, scaled by each row's rstd at the end.
        # RESIDUAL: y = res + (the output rounded to y's dtype), summed in fp32
        p = tl.program_id(0)
        wait_for_previous_grid(PDL, TRIGGER)  # programmatic dependent launch (ops/pdl.py)
        # W_ALIGN: the weights' address alignment in bytes (16 when every weight is): an address read
        # from the table is otherwise of unknown alignment and the weight loads are not vectorised
        w = tl.multiple_of(tl.load(tab_ptr + p * 6).to(tl.pointer_type(x_ptr.dtype.element_ty)), W_ALIGN)
        r0 = tl.load(tab_ptr + p * 6 + 1)
        rows = tl.load(tab_ptr + p * 6 + 2)
        col0 = tl.load(tab_ptr + p * 6 + 3)
        o_r = r0 + tl.arange(0, BLOCK_R)
        if MULTI_X:
            # one input per weight: this program's starts at its table entry's offset, rows SX apart.
            # X_ALIGN (elements) tells the compiler the offsets' alignment: without it the input's
            # loads are not vectorised (an output projection took 18.8 us instead of 9.5 on an H100)
            x_in = x_ptr + tl.multiple_of(tl.load(tab_ptr + p * 6 + 5), X_ALIGN)
            sx = SX
        else:
            x_in = x_ptr
            sx = D
        m_r = o_r < rows
        o_n = tl.arange(0, NT)
        m_n = o_n < N
        acc = tl.zeros([NT, BLOCK_R], dtype=tl.float32)
        b_ss = tl.zeros([NT], dtype=tl.float32)  # NORM: sum of x^2 per token row
        for d0 in range(0, D, BLOCK_D):
            o_d = d0 + tl.arange(0, BLOCK_D)
            m_d = (o_d < D) | EVEN_D
            b_w = tl.load(w + o_r[:, None] * D + o_d[None, :], mask=m_r[:, None] & m_d[None, :], other=0.0)
            b_x = tl.load(x_in + o_n[:, None] * sx + o_d[None, :], mask=m_n[:, None] & m_d[None, :],
                          other=0.0).to(tl.float32)
            if NORM:
                b_ss += tl.sum(b_x * b_x, axis=1)
                b_x = b_x * tl.load(nw_ptr + o_d, mask=m_d, other=0.0).to(tl.float32)[None, :]
            acc += tl.sum(b_w[None, :, :].to(tl.float32) * b_x[:, None, :], axis=2)
        if NORM:  # W (x * rstd * nw) = rstd * (W (x * nw)): before the conv step's rounding, as if x were normed
            acc = acc * tl.rsqrt(b_ss / D + eps)[:, None]
        if CONV:
            seg = tl.load(tab_ptr + p * 6 + 4)
            win_addr = tl.load(conv_tab + seg * 2)
            if win_addr != 0:  # this weight's outputs go through a short-conv step (+ SiLU)
                win = win_addr.to(tl.pointer_type(x_ptr.dtype.element_ty))
                cw = tl.load(conv_tab + seg * 2 + 1).to(tl.pointer_type(x_ptr.dtype.element_ty))
                b_y = acc.to(x_ptr.dtype.element_ty).to(tl.float32)  # the projection as F.linear rounds it
                o_w = tl.arange(0, WP)
                p_win = win + ((o_n[:, None, None] * rows + o_r[None, :, None]) * (W - 1) + o_w[None, None, :])
                m_win = m_n[:, None, None] & m_r[None, :, None] & (o_w < W - 1)[None, None, :]
                b_win = tl.load(p_win, mask=m_win, other=0).to(tl.float32)
                b_full = tl.where((o_w == W - 1)[None, None, :], b_y[:, :, None], b_win)  # oldest .. newest
                b_cw = tl.load(cw + o_r[:, None] * W + o_w[None, :], mask=m_r[:, None] & (o_w < W)[None, :], other=0)
                b_c = tl.sum(b_full * b_cw[None, :, :].to(tl.float32), axis=2)
                # the window shifted by one with the new projection appended
                b_next = tl.load(p_win + 1, mask=m_win & (o_w < W - 2)[None, None, :], other=0)
                b_next = tl.where((o_w == W - 2)[None, None, :], b_y[:, :, None].to(b_next.dtype), b_next)
                tl.debug_barrier()  # every thread has read its window before any thread overwrites it
                tl.store(p_win, b_next, mask=m_win)
                acc = b_c * tl.sigmoid(b_c)
        m_y = m_n[:, None] & m_r[None, :]
        if RESIDUAL:  # as the separate add: the output rounded to y's dtype, then res + out in fp32, rounded
            b_res = tl.load(res_ptr + o_n[:, None] * OUT + col0 + o_r[None, :], mask=m_y, other=0.0)
            acc = acc.to(y_ptr.dtype.element_ty).to(tl.float32) + b_res.to(tl.float32)
        p_y = y_ptr + o_n[:, None] * OUT + col0 + o_r[None, :]
        tl.store(p_y, acc.to(y_ptr.dtype.element_ty), mask=m_y)

    return fused_linear_kernel


_KERNEL = None


def fused_linear(x: torch.Tensor | Sequence[torch.Tensor], weights: Sequence[torch.Tensor], *, conv_steps=None,
                 norm_weight: torch.Tensor | None = None, eps: float = 1e-6, residual: torch.Tensor | None = None,
                 backend: str = "auto") -> list[torch.Tensor]:
    """``x [N, D]`` times each ``weights[i] [R_i, D]`` (transposed): the list of ``[N, R_i]`` outputs;
    ``x`` may be a list of one ``[N, D]`` input per weight; ``conv_steps`` (one entry or None per
    weight) adds a short-conv step to chosen outputs, updating their windows in place;
    ``norm_weight [D]`` multiplies ``rms_norm(x, norm_weight, eps)`` instead of ``x`` (tensor ``x``
    only); ``residual [N, sum R_i]`` is added to the outputs (module docstring).

    One Triton launch on CUDA for ``N <= MAX_TOKENS`` (each weight read once, fp32 sums); otherwise,
    on CPU, and when a gradient must flow (the kernel has no backward), one ``F.linear`` per weight,
    the norm, conv steps and residual add apart. No host sync: the step can be graph-captured."""
    x0 = _check(x, weights)
    _check_epilogues(x, weights, norm_weight, residual)
    xs = [x] if isinstance(x, torch.Tensor) else list(x)
    N, D = x0.shape
    W = _check_conv_steps(x0, weights, conv_steps) if conv_steps is not None else 0
    chosen = resolve_backend(backend, x0.device)
    extra = [t for t in (norm_weight, residual) if t is not None]
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (*xs, *weights, *extra))
    conv_ok = W == 0 or (W >= 2 and all(st is None or (st[0].is_contiguous() and st[1].is_contiguous()
                                                        and st[0].dtype == st[1].dtype == x0.dtype)
                                        for st in conv_steps))
    if (chosen == "reference" or N > MAX_TOKENS or N == 0 or needs_grad or not conv_ok
            or not all(w.is_contiguous() for w in weights)):
        return fused_linear_ref(x, weights, conv_steps, norm_weight=norm_weight, eps=eps, residual=residual,
                                backend=chosen)
    import triton

    global _KERNEL
    if _KERNEL is None:
        _KERNEL = _kernel()
    tile = _tiles(D, sum(w.shape[0] for w in weights), norm_weight is not None)
    block_d = min(tile["BLOCK_D"], triton.next_power_of_2(D))
    if isinstance(x, torch.Tensor):
        x, x_offsets, sx = x.contiguous(), (0,) * len(weights), D
    else:
        x, x_offsets, sx = _inputs_in_one_buffer(xs)
    tab, out, w_align = _block_table(weights, tile["BLOCK_R"], x_offsets)
    launch = pdl_launch(x.device, "fused_linear")
    y = torch.empty(N, out, device=x.device, dtype=x.dtype)
    conv_tab = _conv_table(conv_steps, x.device) if W else tab
    multi = any(x_offsets) or sx != D
    align = 8 if all(o % 8 == 0 for o in x_offsets) and sx % 8 == 0 else 1
    nw = norm_weight.contiguous() if norm_weight is not None else x  # x stands in for an unread pointer
    res = residual.contiguous() if residual is not None else x
    _KERNEL[(tab.shape[0],)](x, tab, conv_tab, y, nw, res, N, D, out, sx, float(eps),
                             NT=max(1, triton.next_power_of_2(N)),
                             MULTI_X=multi, X_ALIGN=align, W_ALIGN=w_align,
                             BLOCK_R=tile["BLOCK_R"], BLOCK_D=block_d, EVEN_D=D % block_d == 0,
                             CONV=W > 0, W=max(W, 2), WP=triton.next_power_of_2(max(W, 2)),
                             NORM=norm_weight is not None, RESIDUAL=residual is not None,
                             num_warps=tile["num_warps"], **launch)
    return list(y.split([w.shape[0] for w in weights], dim=1))


def few_rows_linear(x: torch.Tensor, weight: torch.Tensor, *, residual: torch.Tensor | None = None,
                    backend: str = "auto") -> torch.Tensor:
    """``F.linear(x, weight)`` for ``x [..., D]`` (plus ``residual [..., R]``, in the kernel's epilogue);
    through :func:`fused_linear`'s kernel when x has at most ``MAX_TOKENS`` rows (a decode step's output
    projection: 7.3 us against cuBLAS's 8.5 on an H100)."""
    rows = x.numel() // max(x.shape[-1], 1)
    if residual is not None and tuple(residual.shape) != (*x.shape[:-1], weight.shape[0]):
        raise ValueError(f"residual must be {(*x.shape[:-1], weight.shape[0])} (x's rows, weight's), "
                         f"got {tuple(residual.shape)}")
    if rows > MAX_TOKENS or rows == 0:
        y = F.linear(x, weight)
        return y if residual is None else residual + y
    res = residual.reshape(rows, weight.shape[0]) if residual is not None else None
    (y,) = fused_linear(x.reshape(rows, x.shape[-1]), [weight], residual=res, backend=backend)
    return y.view(*x.shape[:-1], weight.shape[0])
