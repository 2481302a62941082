"""Shared pieces of the chunked KDA kernels: chunk tables and launch constants (needs no Triton).

Every kernel sees the input as one packed stream of ``Ttot = B * T`` tokens (a padded batch is a
varlen pack with ``cu_seqlens = [0, T, 2T, ...]``). A *chunk* is up to ``C = 64`` consecutive tokens
of one sequence; chunks never cross sequences. Per-chunk kernels run one program per (chunk, value
head); state kernels run one program per (sequence, value head, V-tile) and walk the sequence's
chunks ``chunk_first[n] .. chunk_first[n+1]-1`` in order.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

CHUNK = 64  # tokens per chunk (docs/kda.md, step 2)
SUB = 16  # tokens per sub-chunk: the exact-decay unit (docs/kda.md, step 3)
# exp(-800) is exactly 0 in fp32/fp64; flooring the gate there changes no result and keeps chunk
# cumsums small enough that differences of later small gates stay precise (reference.GATE_FLOOR).
GATE_FLOOR = -800.0


@dataclass(frozen=True)
class ChunkTable:
    """Where each chunk lives in the packed token stream.

    | field        | shape     | meaning                                         |
    |--------------|-----------|-------------------------------------------------|
    | chunk_start  | ``[NC]``  | first token (packed index) of chunk c           |
    | chunk_len    | ``[NC]``  | tokens in chunk c (1..64)                        |
    | chunk_first  | ``[N+1]`` | index of the first chunk of sequence n          |
    | seq_start    | ``[N+1]`` | first token of sequence n (the offsets)         |

    ``full``: chunk c holds the 64 tokens from token 64 c, for every c (the stream starts at 0 and every
    sequence is whole chunks), so a kernel may place it arithmetically (``chunk_fwd.chunk_place``)
    instead of reading the table.
    """

    chunk_start: torch.Tensor
    chunk_len: torch.Tensor
    chunk_first: torch.Tensor
    seq_start: torch.Tensor
    NC: int
    N: int
    full: bool = False


def build_chunk_table(offsets: list[int], device: torch.device) -> ChunkTable:
    """Chunk table for sequences ``[offsets[n], offsets[n+1])`` of the packed stream.

    Tables are cached per (offsets, device): a training loop with fixed shapes builds one once. A new
    table travels to the device in one non-blocking copy from pinned memory, so building it does not
    make the host wait for the GPU's queued work (a plain ``torch.tensor(..., device=cuda)`` does).
    """
    device = torch.device(device)
    key = (tuple(offsets), device)
    table = _TABLES.get(key)
    if table is None:
        table = _build_chunk_table(list(offsets), device)
        if len(_TABLES) >= _TABLE_CACHE_SIZE:
            _TABLES.pop(next(iter(_TABLES)))  # oldest first
        _TABLES[key] = table
    return table


_TABLE_CACHE_SIZE = 64
_TABLES: dict[tuple, ChunkTable] = {}


def _build_chunk_table(offsets: list[int], device: torch.device) -> ChunkTable:
    starts: list[int] = []
    lens: list[int] = []
    first = [0]
    for n in range(len(offsets) - 1):
        s, e = offsets[n], offsets[n + 1]
        for c0 in range(s, e, CHUNK):
            starts.append(c0)
            lens.append(min(CHUNK, e - c0))
        first.append(len(starts))
    parts = [x if x else [0] for x in (starts, lens, first, list(offsets))]
    flat = torch.tensor([v for p in parts for v in p], dtype=torch.int32)
    if device.type == "cuda":
        flat = flat.pin_memory().to(device, non_blocking=True)
    else:
        flat = flat.to(device)
    views = torch.split(flat, [len(p) for p in parts])
    # chunk c then starts at token 64 c (the stream starts at 0 and every sequence is whole chunks)
    full = all(c0 == CHUNK * c and n == CHUNK for c, (c0, n) in enumerate(zip(starts, lens)))
    return ChunkTable(*views, NC=len(starts), N=len(offsets) - 1, full=full)


def pow2(x: int, floor: int = 16) -> int:
    """Smallest power of two >= max(x, floor) (Triton block sizes; tl.dot needs >= 16)."""
    p = floor
    while p < x:
        p *= 2
    return p


# Launch settings per kernel (``num_warps`` / ``num_stages``; for the two scans also the V-tile ``BV``),
# measured best on an H100 with bf16 inputs at B=1 T=65536 H=16 and B=8 T=4096 H=32
# (benchmarks/chunk_kda_sweep.py, results in benchmarks/results/kda/sweep/; docs/kernels.md).
# None means "choose by shape" (the scans, see scan_launch). One table, so that a sweep can try
# settings without editing launch sites.
LAUNCH: dict[str, dict[str, int | None]] = {
    # key blocks of 64: 0.297 ms at 1M tokens x heads (whole K: 0.31-0.32, 32: 0.35; session 7, sweep_v11e)
    # merge_l2norm=1: with the fused q/k norm, the gate's cumsum and the norms in one launch
    # (chunk_fwd._prologue_kernel): 0.048 ms either way at B1 T4K H16, 0.694 -> 0.706 at B8 T4K H32
    # (H100, session15/sweep_switches_fused_22e628e.txt); the whole call replayed from a CUDA graph at
    # B1 T4K H16: fwd 0.379 -> 0.377, fwd+bwd 1.434 -> 1.438 ms (launch_ab_graph_c1d9c35.txt): off
    # merge_rstd=1: in the forward that normalises q / k on load (l2norm on_load), the gate's cumsum and
    # the rstd in one launch (chunk_fwd._rstd_prologue_kernel): H100, session 19, the whole no-grad call
    # graph-replayed (session19/kda_ab_merge_rstd_h100.txt): 0.3707 -> 0.3693 ms at B1 T4K H16 (rounds
    # apart), 4.368 -> 4.367 at B8 T4K H32, 4.321 -> 4.317 at B32 T2K H16, 5.327 -> 5.318 at B1 T64K H16
    # base2=1: in a forward without backward, G cumulated in units of log2 (times log2(e) before the
    # cumsum), so every decay its readers form is one exp2 of a difference, one FMUL per element less.
    # H100, session 20, the whole no-grad call graph-replayed, alternating rounds
    # (session20/kda_ab_base2_h100.txt): 4.365 -> 4.349 ms at B8 T4K H32, 4.317 -> 4.302 at B32 T2K
    # H16, 5.320 -> 5.289 at B1 T64K H16, 0.3694 -> 0.3673 at B1 T4K H16: on. The gain is in the
    # off-diagonal gram and the products (-0.015 ms each at B8 T4K H32); the diagonal gram did not move
    # (1.013 against 1.015), so FLA's faster token-parallel diagonal (0.848 ms, G in base 2) is not
    # faster for its exponentials
    "gate": dict(num_warps=4, num_stages=None, BK=64, merge_l2norm=0, merge_rstd=1, base2=1),
    # the off-diagonal blocks; 0.95 ms at 1M tokens x heads, 0.74-0.76 once a chunk's four sub-chunk
    # programs ran next to each other (session 7; the diagonal blocks inside this kernel by halving
    # levels measured 3.3-3.4 ms for both parts against 2.5 with a separate diagonal kernel:
    # sweep_v10_gram_diag_h100.txt, removed)
    # (session 7: the gate and its chunk cumsum inside this kernel measured 1.38-2.26 ms against 1.07
    # for the two kernels; removed)
    # (session 9: the diagonal blocks factored here too where the gate span allows, row by row, with the
    # pairwise kernel for the rest: 2.21-2.92 ms with fp32 FMA dots, 3.4-4.8 with tf32x3, against 1.75
    # for both kernels as below: session9/sweep_gram_factored_diag.txt; removed)
    "gram": dict(num_warps=4, num_stages=3, BK=32),
    # diagonal gram blocks, token-parallel, only the needed columns, BH value heads per program: 1.105
    # ms with BH 4 on 1 warp (BH 1: 1.35; 2 or 4 warps slower) against 1.56 for the earlier [16, K]-tile
    # form with 8 rows per program (H100, 1M tokens x heads, sweep_v10_gram_diag_h100.txt). Session 7:
    # one program per sub-chunk with rows p and 15 - p paired (1.13-1.53 ms) and by halving levels
    # (1.5-4.2 ms) both lost to it and were removed; every column stored as it is made instead of
    # accumulated in registers: 0.887 ms with BH 2 on 1 warp against 1.07 for the accumulating form at
    # BH 4 (fewer registers, more programs per SM; session 7, sweep_v11c)
    # (session 16, H100, layer-fused, sweep_gram_levels_gram_diag_fused_2feb3fa.txt: the exponent
    # unclamped (G_r - G_j is <= 0 up to G's rounding; 8 fewer PTX instructions per column) measured
    # 1.006 against 1.003 ms at B8 T4K H32 and 0.067 against 0.067 at B1 T4K H16: no gain, removed. BH 4
    # on 2 warps: 0.978 / 0.069, within 3% either way; BH 8 on 2 or 4 warps 0.992-0.996 against 0.987
    # (sweep_exp_ftz_fused_fa18273.txt). The whole gram in one launch by halving levels
    # over the 64-token chunk (every pair through its level's group midpoint, [32, K] x [K, 32] dots, 6
    # exponentials per (row, channel)) measured 1.91-5.2 ms against 1.74 for this kernel with _gram_kernel
    # at B8 T4K H32 (0.141 against 0.119 at B1 T4K H16; fwd graph-replayed 0.419 against 0.379): lost,
    # removed -- the third loss of the levels in the forward)
    # fill=1: zeros stored above the diagonal within the 16x16 block, so that no 32-byte sector of a row is
    # left partly written (L2 merges such a sector with DRAM's copy). FLA's same loop took 0.85 ms against
    # our 0.99 at B8 T4K H32 with the same instructions per column but for our clamp; H100, session 21,
    # layer-fused no-grad forward graph-replayed (session21/kda_ab_gram_solve_diag_fill_h100.txt): the
    # kernel 0.990 -> 0.876 ms, the call 4.271 -> 4.156 ms at B8 T4K H32, 5.185 -> 5.075 at B1 T64K H16:
    # on. (Two columns per loop trip for more loads in flight, the same run: 4.273 / 5.192, no gain,
    # removed.)
    # (The diagonal blocks as tiered products per key block of 16 / 32 channels, the decay products'
    # tiers with the contraction over channels: 1.21 / 1.12 ms against this kernel's 0.88 at B8 T4K H32,
    # the call 3.91 -> 4.20 / 4.13 ms, layer-fused, graph-replayed, H100 session 23: removed.)
    "gram_diag": dict(num_warps=1, num_stages=None, BH=2, fill=1),
    # the solve as two kernels: the inverse (latency-bound forward substitution, small tiles) on
    # inverse_warps, the products (memory-bound) on (chunk, head, column block of BV) programs with
    # num_warps. At 1M tokens x heads on an H100: 1.20 ms for both (BV 64 on 8 warps or 4 (4 spills),
    # inverse on 1 warp; 2 warps: 1.40) against 1.66-1.70 for the earlier one-kernel solve (session 7,
    # sweep_v11c; the off-diagonal gram blocks inside the one-kernel solve measured 5.48 ms:
    # session6/sweep_fused_gram_h100.txt)
    "solve": dict(num_warps=8, num_stages=1, BV=64, inverse_warps=1),
    # on=1: the off-diagonal gram and the inverse in one launch per (chunk, value head) after the diagonal
    # gram (_gram_solve_kernel: Araw's off-diagonal blocks stay in registers, stored only for a backward),
    # instead of _gram_kernel + _inverse_kernel (FLA 0.6.0's fused inter + solve: 0.83 ms at B8 T4K H32,
    # its autotuning picks 1 warp, 2.35 ms on 4). H100, session 21, layer-fused no-grad forward
    # graph-replayed (session21/kda_ab_gram_solve_diag_fill_h100.txt), 1 warp, 16-row x 32-key tiles: the
    # kernel 0.662 ms against 0.740 + 0.183 for the two, the call 4.271 -> 4.000 ms at B8 T4K H32, 5.185 ->
    # 4.899 at B1 T64K H16; 2 warps 4.254 / 5.135, 4 warps 4.907 / 5.750 (255 registers at any width: few
    # programs per SM, so one warp each); BK 16 4.100 / 5.000, but faster where programs are few (B1 T4K
    # H16, 1024 programs: 0.046 ms against 0.055): few_programs is the NC x HV up to which BK 16 is taken
    "gram_solve": dict(on=1, num_warps=1, num_stages=None, BK=32, few_programs=2048),
    # output: the output (step 5) inside the forward scan instead of _output_kernel: 1 always, 0 never,
    # None where the scan runs 64-wide tiles (many sequences x heads; chunk_fwd.chunk_kda_fwd)
    # skip_saved=1: a forward with no backward to follow (grad mode off, or no input needs a gradient)
    # and the output inside the scan does not store the per-chunk states h (512 B per (token, head) in
    # bf16) and W (256 B), which only the backward reads then (predicted ~0.25 ms of the scan's 1.09 at
    # B8 T4K H32). Measured on the H100 (session 17, layer-fused, graph-replayed, no_grad, alternating
    # rounds; results/kda/session17/kda_ab_skip_saved_h100.txt): fwd 4.653 -> 4.459 ms at B8 T4K H32.
    # On by default; 0 keeps the stores (A/B)
    "state_fwd": dict(num_warps=None, num_stages=None, BV=None, output=None, skip_saved=1),
    # 0.645 ms on 2 warps against 0.69 on 8 at 1M tokens x heads (session 7, sweep_v11g)
    "output": dict(num_warps=2, num_stages=2),
    # dw_local=1: the scan's dO-only term (scale Aqk^T dO, an fp32 [64,64] tile and a tf32 dot per chunk
    # and V-tile) as a parallel kernel before the scan, as FLA 0.6.0 splits it. H100 sweep at 1M tokens x
    # heads (sweep_v8_variants_h100.txt): scan 3.05 -> 2.24 ms (BV 16), 5.52 -> 3.90 (BV 64); fwd+bwd
    # 24.16 -> 23.83 ms including the new kernel's time. Session 9, with today's kernels around it, the
    # other way round: both kernels 2.80 ms against the scan alone 2.55 (B1 T64K H16, BV 16), 1.84
    # (BV 64) against 1.39 (BV 32) at B8 T4K H32; fwd+bwd 20.30 -> 20.06 and 18.69 -> 18.27
    # (session9/sweep_scans_8warps.txt: 8 warps, spill-free for sm_90a at BV 32, were slower)
    # (session 18, H100, bf16: num_stages=1 for either scan -- 2 CTAs per SM instead of one with ~150-220
    # KB of pipeline buffers -- gave the no-grad forward 4.46 -> 4.38 ms at B8 T4K H32 (state_fwd), but
    # faulted with an illegal address in the state-gradient scan at B8 T4K H32 (BV 32, 4 warps) and in
    # the forward scan at B1 H16 (BV 16, 8 warps); not understood, not used: results/kda/session18/
    # scan_one_stage_fault_h100.txt. fp32 inputs run one stage at BV 32 on 8 warps and pass their tests.
    # Possibly the Triton fault reported for sm_90 kernels with several dots, triton-lang/triton#10486 and
    # #11366 (an invalid shared-memory read by wgmma); not confirmed here)
    "state_bwd": dict(num_warps=None, num_stages=None, BV=None, dw_local=0),
    "dw_local": dict(num_warps=4, num_stages=None),
    # chunk grads: 8 warps 5.76 ms, 4 warps 7.7 (dots on the stored half operands: 5.74, no gain, removed)
    # (3-pass tf32 dots here did not change the gate gradients' error: session7/grad_precision_h100.txt)
    # BK / BV: its key block and V tile (None: 64 / 32 at K = 128). sm_90a: 255 registers with 572 B of
    # spills, none at BK 32 / BV 32 on 8 warps -- yet that measured 8.99 ms against 5.75 (twice the key
    # blocks re-read dO, W and dW), BK 64 / BV 16 7.37 (H100, 1M tokens x heads, session 9:
    # session9/sweep_chunk_grad_tiles.txt)
    # v_apart=1: key block 0's V-only work (dv, dAqk, the U-parts of dA / dbeta) as one more program per
    # (chunk, head), so no key-block program carries its accumulators (chunk_bwd._v_only_program); it
    # re-reads dO, W, dW and M (~1 KB per (token, head)), and BV None then means 64 where shared memory
    # allows. Session 18, H100, Nsight Compute at B8 T4K H32 (results/kda/session18/): 5.92 ms, 255
    # registers (one 8-warp program per SM), 15M spill requests, DRAM 42%; v_apart with BV 32: 5.83 ms,
    # 1M spill requests, occupancy unchanged. Whole layer-fused call, graph-replayed, alternating rounds:
    # fwd+bwd 18.69 -> 19.04 (BV 32) / 18.54 (BV 64) ms at B8 T4K H32, 1.356 -> 1.363 / 1.347 at B1 T4K H16
    # half_dots=1 (with v_apart): the V loop's products dO h^T, W dh^T, dW h^T (and dO W^T) on the stored
    # half tiles instead of tf32 on widened copies (the same exact products; fp32 sums). Session 18, same
    # A/B (results/kda/session18/kda_ab_half_dots_scan_stages_h100.txt): fwd+bwd 18.59 -> 18.21 ms at B8
    # T4K H32, 18.55 -> 18.22 at B32 T2K H16 (with state_fwd num_stages=1, neutral in fwd+bwd alone),
    # 1.353 -> 1.318 at B1 T4K H16, 20.38 -> 20.01 at B1 T64K H16 (kda_ab_half_dots_b1_h100.txt)
    # (Session 23: the V loop's five tiles through TMA descriptors made on the host -- spill-free at 255
    # registers for sm_90a, rows past a chunk's end read from the next sequence and met by exact zeros --
    # passed the interpreter and GPU tests but measured slower: 4.848 -> 4.929 ms, the call 17.15 ->
    # 17.26 ms fwd+bwd at B8 T4K H32, 1.243 -> 1.250 at B1 T4K H16 (H100, layer-fused, graph-replayed;
    # results/kda/session23/kda_ab_chunk_grad_tma_h100.txt): not kept. The tiles again with v_apart and
    # half_dots, same run type (kda_ab_chunk_grad_tiles_h100.txt): the kernel 4.88 ms at these settings,
    # 6.73 at BK 32, 6.36 at BK 32 on 4 warps, 5.02 on 2 stages; the call 17.07 -> 19.11 / 18.72 / 17.24.)
    "chunk_grad": dict(num_warps=8, num_stages=3, BK=None, BV=None, v_apart=1, half_dots=1),
    "grad_finish": dict(num_warps=4, num_stages=None),
    # decay products, one program per sub-chunk, diagonal sub-block by halving levels: 5.23 ms with 4
    # warps and BK 32 (2 warps BK 16: 7.8; 8 warps: 9-17) against 6.90 for the earlier two 16-step loops
    # at 1M tokens x heads (sweep_v9_levels_h100.txt)
    # precise (chunk_bwd.decay_precision): the single-pass tf32 form (0) left the gate gradients far
    # from the fp64 reference in bf16 (dA_log 6.2-8.7e-2 relative RMS, ddt_bias 3.2-4.5e-2, dg 8-9e-3;
    # FLA 0.6.0: 6.2e-3, 7.4e-3, 4.1e-3): the decayed operands' rounding does not cancel in dG. 3-pass
    # (1): dA_log 0.35-0.94e-2, ddt_bias 4.5e-3, dg 5.0e-3, at 8.3-8.4 ms instead of 5.24 at 1M tokens x
    # heads (session 7). Two passes with only the decayed operand split (4, on 2 warps): the same errors
    # as 3-pass to 3 digits (dA_log 1.3e-3 / 3.3e-3 / 3.4e-3) at 6.67 ms; operands rounded instead of
    # truncated in one pass (2): errors halved only, 5.59 ms (H100, session 8: grad_precision_split_h100
    # .txt, sweep_v12b_split_decay_h100.txt). precise=0 is the fastest option.
    # factored=1: a sub-chunk whose gate span is <= 60 takes its diagonal pairs through one reference
    # (one exponential pair per element, four dots) instead of the halving levels; other sub-chunks keep
    # the levels, so it stays exact for any gate (chunk_bwd._diag_factored). H100, session 9, 1M tokens x
    # heads (Figure-2 gates): 6.71 -> 4.96 ms on 2 warps (5.51 on 4), 3.5e-5 from the levels' output;
    # fwd+bwd 21.95 -> 20.27 ms (session9/sweep_decay_grad_factored.txt). With the layer-fused
    # benchmark's larger gates (A up to 16: most sub-chunks span > 60) it costs 6.70 -> 7.17 ms; tiers
    # of 8- and 4-row groups did not help there (7.29; session9/sweep_decay_grad_tiers_fused.txt), nor
    # did two launches each compiled with one form, programs split by span (session 10, B8 T4K H32:
    # 7.03 ms fused gates against 6.91 / 6.69 for this switch / the levels, 5.15 against 4.93 with
    # Figure-2 gates; session10/sweep_decay_grad_partition*.txt; removed)
    # factored=2: the reference at the midpoint of each channel's range, so sub-chunks spanning up to 120
    # take the factored form (chunk_bwd._diag_factored); rolled=1: the halving levels as a loop, not
    # unrolled (for sm_90a 238 registers and no spills instead of 255 and 228 B). H100, session 15, the
    # layer-fused benchmark's gates: 0.455 -> 0.416 ms at B1 T4K H16, 6.894 -> 6.429 at B8 T4K H32 (each
    # alone: 0.425 / 0.451 and 6.687 / 6.833; 4 warps slower everywhere); 5.4e-5 from the levels' output
    # (session15/sweep_switches_fused_22e628e.txt)
    # factored=3 (tiered): the fewest halving levels after which every aligned group of the rows left spans
    # <= 120 on every channel, then each group through its own midpoint (chunk_bwd._diag_tiered); the
    # benchmark's gates (32-channel blocks): 45% of the sub-chunks factor whole, 36% after one level, the
    # rest after two, where factored=2 sent 55% to all four levels. 240 registers, no spills for sm_90a.
    # H100, session 22, layer-fused, graph-replayed, alternating rounds (session22/kda_ab_decay_tiered_h100
    # .txt): the decay products 5.67 -> 5.15 ms at B8 T4K H32, 5.58 -> 5.05 at B1 T64K H16, 0.368 -> 0.327
    # at B1 T4K H16; fwd+bwd 17.60 -> 17.09, 19.26 -> 18.73, 1.279 -> 1.243; gradients' error against fp64
    # unchanged (grad_precision_tiered_h100.txt)
    "decay_grad": dict(num_warps=2, num_stages=3, BK=32, precise=4, factored=3, rolled=1),
    # merge_l2norm=1: without GVA, the gate gradients and the q/k norm's backward in one launch
    # (chunk_bwd._epilogue_kernel): 0.089 -> 0.083 ms at B1 T4K H16, 1.327 -> 1.285 at B8 T4K H32 for the
    # two kernels' work (H100, session15/sweep_switches_fused_22e628e.txt)
    "gate_grad": dict(num_warps=4, num_stages=None, merge_l2norm=1),
    # half_dy=1: with the fused q/k l2norm, the decay products write dq / dk in the input dtype (not
    # fp32) for the l2norm backward to read: 1 KB less traffic per (token, head) for half inputs. The
    # final gradient is rounded to that dtype anyway; the intermediate rounding adds an error of the
    # same size (~2^-9 relative, bf16; 2.8e-3 relative from the fp32 hand-over). H100, session 15: the
    # decay products and the norm's backward 0.499 -> 0.480 ms at B1 T4K H16, 7.587 -> 7.330 at B8 T4K
    # H32 (session15/sweep_switches_fused_22e628e.txt)
    # on_load=1: in a forward no backward follows (inference, prefill), the fused q/k norm applied on load
    # by the kernels that read q / k (gram, diagonal gram, solve products) from its rstd alone, written
    # head-major by chunk_fwd._rstd_kernel (reads q / k once, 8 B out per (token, head)), instead of
    # normalised copies (512 B more written per (token, head)). H100, session 19, the whole call
    # graph-replayed (session19/kda_ab_norm_on_load_v3_h100.txt): fwd 4.471 -> 4.362 ms at B8 T4K H32,
    # 4.445 -> 4.321 at B32 T2K H16, 5.424 -> 5.312 at B1 T64K H16, 0.375 -> 0.372 at B1 T4K H16 (the
    # rstd kernel 0.19 ms against the norm kernel's 0.35; the grams 0.07 ms slower; the solve products
    # level once the rstd joined their row scales: 0.06 ms slower when it scaled the loaded q / k tiles,
    # 86 registers and two programs per SM, session19/kda_ab_norm_on_load_v2_h100.txt). With the backward's
    # readers normalising on load too (no copies in training either) fwd+bwd measured 0.2-0.4% slower
    # (18.27 against 18.20 at B8 T4K H32; the decay products and chunk gradients 0.06-0.1 ms slower):
    # not kept. A first form (the rstd summed inside the gram from its own loads, stored token-major,
    # read strided) measured 1-2% slower in both modes (session19/kda_ab_norm_on_load_v1_h100.txt)
    "l2norm": dict(half_dy=1, on_load=1),
    # fp32 intermediates kept in bf16 when the inputs are bf16 (as FLA 0.6.0 keeps them): aqk=1 the
    # per-chunk q.k products Aqk [Ttot, HV, 64] (written by the two grams; read by the output, the
    # state-gradient scan and dw_local: 128 B less per (token, head) per pass); dw=1 the state-gradient
    # scan's dW [Ttot, HV, V] (read by the chunk-gradient kernel, once per key block: 256 B less per
    # (token, head) per pass; the scan already carries dW in bf16 into its state update, so the
    # chunk-gradient kernel then reads exactly what the recurrence used; with state_bwd dw_local the
    # parallel kernel's dO term is rounded once before the scan adds its part). fp16 inputs keep fp32.
    # H100, session 17, layer-fused, graph-replayed (results/kda/session17/kda_ab_half_store_h100.txt):
    # dw=1 fwd+bwd 19.40 -> 19.13 ms at B8 T4K H32, 1.399 -> 1.387 at B1 T4K H16 (forward unchanged): on.
    # aqk=1 split by shape: with its readers converting the tile to fp32, B1 T4K H16 fwd 0.374 -> 0.365,
    # fwd+bwd -> 1.377, but B8 T4K H32 fwd 4.459 -> 4.563, fwd+bwd -> 19.98; with the readers' dots in
    # bf16 (as now: exact products of the stored values, the fp32 path's code unchanged) fwd 0.373 ->
    # 0.366 and 4.465 -> 4.447, but fwd+bwd 1.379 -> 1.392 and 19.14 -> 19.46
    # (kda_ab_half_store_aqk_dot_h100.txt): off
    # dqk=1: the chunk-gradient kernel's parts of dq and dk (fp32 [Ttot, HV, K] each, completed by the
    # decay products) in bf16: 2 x 256 B less written and read per (token, head), predicted ~0.35 ms of
    # B8 T4K H32's fwd+bwd; the parts are rounded once more before the decay products add theirs (an
    # error of the size half_dy adds). With half_dy and no GVA sum the decay products then complete them
    # in place. H100, session 18, layer-fused, graph-replayed, alternating rounds
    # (results/kda/session18/kda_ab_half_store_dqk_h100.txt): fwd+bwd 19.13 -> 18.68 ms at B8 T4K H32,
    # 1.382 -> 1.356 at B1 T4K H16; its GPU tests (K = V = 128, extreme gates) passed: on
    "half_store": dict(aqk=0, dw=1, dqk=1),
    # full=1: where every chunk is full (ChunkTable.full: each sequence's length a multiple of 64), the
    # forward's per-chunk kernels place their chunk from its index instead of loading the chunk table
    # first (chunk_fwd.chunk_place: no dependent load ahead of a program's own). H100, session 20, the
    # whole no-grad call graph-replayed, alternating rounds: in the diagonal gram alone (its 512 K one-warp
    # programs at B8 T4K H32; session20/kda_ab_full_chunks_h100.txt) 4.347 -> 4.326 ms at B8 T4K H32; in
    # every forward per-chunk kernel (kda_ab_full_chunks_all_h100.txt) 4.345 -> 4.257 at B8 T4K H32, 4.312
    # -> 4.212 at B32 T2K H16, 5.279 -> 5.180 at B1 T64K H16, 0.3677 -> 0.3633 at B1 T4K H16 (prologue
    # -0.03, grams -0.02 to -0.03 each, output -0.017): on.
    # bwd=1: the same in the backward's per-chunk kernels (dW local, chunk gradients and their finish,
    # decay products, gate gradients). H100, session 21, fwd+bwd graph-replayed, alternating rounds
    # (session21/kda_ab_chunks_bwd_h100.txt): 18.11 -> 17.86 ms at B8 T4K H32, 18.06 -> 17.77 at B32 T2K
    # H16, 19.82 -> 19.51 at B1 T64K H16, 1.311 -> 1.301 at B1 T4K H16 (decay products -0.14 to -0.23,
    # chunk gradients -0.07 to -0.15, the finish -0.02): on.
    "chunks": dict(full=1, bwd=1),
}


def stored_dtype(what: str, input_dtype: torch.dtype) -> torch.dtype:
    """Storage dtype of intermediate ``what`` ("aqk", "dw" or "dqk") for inputs of ``input_dtype``: bf16 where
    the inputs are bf16 and the launch table's ``half_store`` says so, else fp32."""
    return torch.bfloat16 if input_dtype == torch.bfloat16 and LAUNCH["half_store"][what] else torch.float32


@contextmanager
def launch_overrides(edits: dict[str, dict[str, int | None]]):
    """:data:`LAUNCH` with ``edits`` (``{entry: {key: value}}``) in force for a ``with`` block, restored
    after it, also when it raises. Unknown entries or keys are refused (``KeyError`` naming them) before
    anything is written. The sweep and the A/B scripts set their candidates through this."""
    unknown = [f"{e}.{k}" for e, kv in edits.items() for k in kv if e not in LAUNCH or k not in LAUNCH[e]]
    if unknown:
        raise KeyError(f"launch table has no {', '.join(unknown)}")
    old = {e: dict(LAUNCH[e]) for e in edits}
    try:
        for e, kv in edits.items():
            LAUNCH[e].update(kv)
        yield
    finally:
        for e, entry in old.items():
            LAUNCH[e].clear()
            LAUNCH[e].update(entry)


def launch(name: str, tile: tuple[int, int] | None = None) -> dict[str, int]:
    """Triton launch keywords of kernel ``name`` from :data:`LAUNCH`. ``tile`` is the (rows, cols) of
    the kernel's main register tile: tiles smaller than 32x32 get at most 4 warps (the scans at
    K = V = 16 faulted with 8 warps on an H100; with 4 they pass)."""
    cfg = LAUNCH[name]
    kw = {"num_warps": int(cfg["num_warps"] or 4)}
    if tile is not None and tile[0] * tile[1] < 32 * 32:
        kw["num_warps"] = min(kw["num_warps"], 4)
    if cfg.get("num_stages"):
        kw["num_stages"] = int(cfg["num_stages"])
    return kw


_SM_COUNT: dict[int, int] = {}


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (132 assumed elsewhere: the interpreter)."""
    if device.type != "cuda":
        return 132
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


_SHARED_MEMORY: dict[int, int] = {}


def max_shared_memory(device: torch.device) -> int:
    """Shared memory one program may use on ``device``, in bytes (Triton's own figure, the limit it
    checks at launch; 227 KB, an H100's, assumed for the interpreter)."""
    if device.type != "cuda":
        return 227 * 1024
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SHARED_MEMORY:
        import triton  # (this module is imported without Triton too)

        _SHARED_MEMORY[idx] = int(triton.runtime.driver.active.utils.get_device_properties(idx)["max_shared_mem"])
    return _SHARED_MEMORY[idx]


def scan_launch(name: str, rows: int, V: int, KP: int, dtype: torch.dtype, device: torch.device) -> tuple[int, dict]:
    """V-tile and launch keywords of a state scan (``name`` "state_fwd" or "state_bwd") over ``rows`` =
    sequences x value heads. A scan is sequential along the sequence, so its parallelism is
    rows x V-tiles. Measured on an H100 (bf16): when 64-wide tiles give at least two programs per SM,
    they are fastest (B=8 T=4096 H=32: fwd scan 0.59 ms vs 0.92 with 32-wide tiles and 8 warps); with
    few rows (B=1, H=16) 16-wide tiles spread the scan over 4x more SMs (fwd 1.26 ms vs 1.52, bwd
    3.05 vs 3.72 at T=65536). fp32 operands keep 32-wide tiles and one stage (shared memory)."""
    cfg = LAUNCH[name]
    if dtype == torch.float32:
        bv, warps, stages = 32, 8, 1
    elif KP != 128:
        # The settings below were measured (and tested) at K = 128 only; at K = 64 the 16-wide
        # state-gradient tile faulted (illegal address) in a 20m-preset training run on an H100.
        # Other head sizes keep the earlier settings, which the GPU tests and that run pass.
        bv, warps, stages = (32 if name == "state_fwd" else (64 if KP <= 64 else 32)), 8, 3
    elif rows * -(-V // 64) >= 2 * sm_count(device):
        # (the state-gradient scan with its dO term inside: 32-wide tiles, 1.39 ms against 1.45 with
        # 64 at B=8 T=4096 H=32; session9/sweep_scans_8warps.txt)
        bv, warps, stages = (64, 4, 2) if name == "state_fwd" else (32, 4, 3)
    else:
        bv, warps, stages = 16, (8 if name == "state_fwd" else 4), 3
    bv = min(int(cfg.get("BV") or bv), pow2(V))
    warps = int(cfg.get("num_warps") or warps)
    if KP * bv < 32 * 32:
        warps = min(warps, 4)
    return bv, {"num_warps": warps, "num_stages": int(cfg.get("num_stages") or stages)}


# Tests set this to True: every buffer the kernels write (outputs and intermediates) then starts
# as NaN, so an element a kernel forgets to write, or a read of one, cannot pass unnoticed.
POISON = False


def alloc(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty`` for kernel buffers, NaN-filled when :data:`POISON` is set."""
    t = torch.empty(shape, dtype=dtype, device=device)
    if POISON:
        t.fill_(float("nan"))
    return t
