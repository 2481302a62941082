"""The forward state scan split along the sequence (Triton + a small torch combine).

The scan (steps 6-7 of docs/kda.md) is serial over a sequence's chunks: at B=1 and a long sequence it
runs N x HV x V-tiles programs (128 at H=16, V=128 with 16-wide tiles) each walking 1,024 chunks at
T=64K, so most of the GPU idles. Per chunk the state moves as

    S_{c+1} = A_c S_c + Kd_c^T U_c,     A_c = Diag(e^{G_last}) - Kd_c^T Wk_c    ([K, K]),

an affine map, so a run of chunks composes to ``S_end = P S_start + S_loc`` with ``P`` the product of
its ``A_c`` and ``S_loc`` what it makes from a zero state. Split each sequence into ``P`` segments of
whole chunks:

1. ``_segment_scan_kernel``: every segment at once, one ``[K, V + K]`` scan from ``[0 | I]``: columns
   ``[0, V)`` follow the state with the segment's U (giving ``S_loc``), columns ``[V, V + K)`` see
   U = 0 and so follow ``x -> A_c x`` from the identity (giving ``P``).
2. ``combine_segments`` (torch, fp64): segment by segment, ``S_start(p+1) = P_p S_start(p) + S_loc_p``
   from the sequence's initial state; the last one is the final state.
3. the ordinary scan over the segments with those starting states (it stores h, W and o as before, so
   the backward is unchanged).

The scan's work roughly triples (phase 1 is 2x wide), but it runs on ``P`` times more programs, each
walking ``1/P`` of the chunks. Launch table ``state_fwd split`` (0 = off; docs/kernels.md v16).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kimi_linear.ops.kda.chunk_common import CHUNK, ChunkTable, build_chunk_table
from kimi_linear.ops.kda.chunk_fwd import scan_program, sequence_chunks
from kimi_linear.ops.kda.fast_exp import exp


def segment_offsets(offsets: list[int], parts: int) -> list[int]:
    """Token offsets of ``parts`` segments per sequence, each a run of whole 64-token chunks from the
    sequence's start (a short sequence gets empty segments); sequence n's segments are
    ``n * parts .. n * parts + parts - 1``."""
    out = [offsets[0]]
    for s, e in zip(offsets[:-1], offsets[1:]):
        nc = -(-(e - s) // CHUNK)
        for p in range(1, parts + 1):
            out.append(min(s + CHUNK * ((p * nc) // parts), e))
    return out


@triton.jit
def _segment_scan_kernel(Kd, G, U, Wk, S_out, seq_start, chunk_first,
                         HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, KP: tl.constexpr,
                         BV: tl.constexpr, PREC: tl.constexpr):
    # phase 1 for one [K, BV] column tile of the [K, V + K] augmented state of one (segment, value head)
    DT: tl.constexpr = Wk.dtype.element_ty
    VA: tl.constexpr = V + K
    i_n, i_hv, o_k, o_v, o_t = scan_program(HV, KP, BV)
    m_k = o_k < K
    m_u = o_v < V  # columns of the state proper; the rest carry the transition
    # [0 | I]: zero in the state's columns, column V + j of the identity in the transition's
    b_S = tl.where((o_k[:, None] == (o_v - V)[None, :]) & m_k[:, None], 1.0, 0.0)
    c0, c1, bos, eos = sequence_chunks(seq_start, chunk_first, i_n)
    for c in range(c0, c1):
        t0 = bos + (c - c0) * 64
        n = tl.minimum(eos - t0, 64)
        m_t = o_t < n
        m_tk = m_t[:, None] & m_k[None, :]
        p_tk = ((t0 + o_t[:, None]) * HV + i_hv) * K + o_k[None, :]
        b_wk = tl.load(Wk + p_tk, mask=m_tk, other=0)
        b_kd = tl.load(Kd + p_tk, mask=m_tk, other=0)
        b_u = tl.load(U + ((t0 + o_t[:, None]) * HV + i_hv) * V + o_v[None, :], mask=m_t[:, None] & m_u[None, :],
                      other=0).to(tl.float32)
        b_gl = tl.load(G + ((t0 + n - 1) * HV + i_hv) * K + o_k, mask=m_k, other=0)
        # the ordinary scan's step, operands rounded as there (the transition's columns see U = 0)
        b_w = b_u - tl.dot(b_wk, b_S.to(DT), input_precision=PREC)
        b_S = b_S * exp(b_gl)[:, None] + tl.dot(tl.trans(b_kd), b_w.to(DT), input_precision=PREC)
    p_out = (i_n.to(tl.int64) * HV + i_hv) * K * VA + o_k[:, None] * VA + o_v[None, :]
    tl.store(S_out + p_out, b_S, mask=m_k[:, None] & (o_v < VA)[None, :])


def segment_scan(Kd, G, U, Wk, seg: ChunkTable, *, HV: int, K: int, V: int, prec: str) -> torch.Tensor:
    """Phase 1: ``[Nseg, HV, K, V + K]`` fp32, each segment's ``[S_loc | P]``."""
    from kimi_linear.ops.kda.chunk_common import pow2, scan_launch

    KP = pow2(K)
    out = torch.empty((seg.N, HV, K, V + K), dtype=torch.float32, device=Kd.device)
    BV, kw = scan_launch("state_fwd", seg.N * HV, V + K, KP, U.dtype, Kd.device)
    kw = dict(kw, num_stages=min(kw["num_stages"], 2))
    _segment_scan_kernel[(triton.cdiv(V + K, BV), seg.N * HV)](
        Kd, G, U, Wk, out, seg.seq_start, seg.chunk_first, HV=HV, K=K, V=V, KP=KP, BV=BV, PREC=prec, **kw)
    return out


def combine_segments(seg_states: torch.Tensor, h0: torch.Tensor | None, parts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Phase 2: from ``[N * parts, HV, K, V + K]`` segment results and the initial states ``[N, HV, K, V]``
    (None: zero), each segment's starting state ``[N * parts, HV, K, V]`` and the final states ``[N, HV,
    K, V]`` (fp32). The chain runs in fp64: a few small matmuls per segment, and no TF32 setting of the
    caller's can round the transitions."""
    NP, HV, K, VA = seg_states.shape
    V = VA - K
    N = NP // parts
    s = seg_states.view(N, parts, HV, K, VA).double()
    S = h0.double() if h0 is not None else torch.zeros((N, HV, K, V), dtype=torch.float64, device=s.device)
    starts = torch.empty((N, parts, HV, K, V), dtype=torch.float32, device=s.device)
    for p in range(parts):
        starts[:, p] = S
        S = torch.matmul(s[:, p, :, :, V:], S) + s[:, p, :, :, :V]
    return starts.view(NP, HV, K, V), S.float()


def split_table(table: ChunkTable, offsets: list[int], parts: int) -> ChunkTable:
    """The chunk table of ``parts`` segments per sequence; its chunks are the original ones, in order."""
    seg = build_chunk_table(segment_offsets(offsets, parts), table.chunk_start.device)
    if seg.NC != table.NC:
        raise AssertionError(f"segments changed the chunking: {seg.NC} chunks against {table.NC}")
    return seg
