"""L2 prefetch of a later kernel's weights, on a side stream beside the decode step's short kernels.

At batch 1 a decode step alternates kernels that stream weights from HBM (the projections, bound by
bandwidth) with short kernels bound by their own chain of loads, reductions and stores (the KDA
low-rank gates, recurrence and per-head norm; the latent attention's launches at short context),
during which HBM is mostly idle. :func:`prefetch_l2_` forks a small kernel onto a side stream that asks
the L2 for a tensor a later kernel of the step reads (``cp.async.bulk.prefetch.L2``, Hopper's bulk-copy
engine, one instruction per ``CHUNK`` bytes), so that the later kernel finds it in the 50 MB L2;
:func:`join_prefetches` makes the calling stream wait for every forked prefetch (the model does so at the
end of its layers, so a CUDA-graph capture of the step ends joined).

Why a side stream: the same prefetch issued from extra programs of the short kernels themselves made
them last as long as the prefetch (a grid completes when its prefetching programs do, and every decode
kernel waits for its predecessor's completion), 2.84 -> 2.93 ms per step (docs/decode.md).

Safe anywhere in a step: a prefetch writes nothing visible, and what is prefetched are weights, which
no kernel of a decode step writes. A hint: results are bit-identical with it on and off (tested).

| name                 | meaning                                                                        |
|----------------------|--------------------------------------------------------------------------------|
| ``ENABLED``          | global switch (benchmarks turn it off for an A/B in one process)                |
| ``CHUNK``            | bytes per prefetch instruction                                                   |
| ``PROGRAMS``         | programs of one prefetch launch (at most one per ``CHUNK``)                      |
| ``prefetch_plan``    | ``tensor`` -> ``(nbytes, programs)``; ``programs`` 0 when not possible on its GPU  |
| ``prefetch_l2_``     | fork one prefetch of a tensor onto the device's side stream; whether it did      |
| ``join_prefetches``  | the current stream waits for the forked prefetches                               |
"""

from __future__ import annotations

import torch

from kimi_linear.backends import triton_interpret
from kimi_linear.ops.pdl import hopper_or_later

__all__ = ["CHUNK", "ENABLED", "PROGRAMS", "join_prefetches", "prefetch_l2_", "prefetch_plan"]

ENABLED = True
CHUNK = 16384
PROGRAMS = 16

_side_streams: dict[torch.device, torch.cuda.Stream] = {}
# device -> whether the forked prefetches were queued during a CUDA-graph capture: a capture must join its
# own forks, and may not wait on work queued outside it (left to run: prefetches write nothing)
_pending: dict[torch.device, bool] = {}


def prefetch_plan(t: torch.Tensor | None) -> tuple[int, int]:
    """``(nbytes, programs)`` of a prefetch of ``t``; ``programs`` is 0 when the switch is off, there is
    nothing to prefetch, the device is not Hopper or later (the instruction is sm_90's), the Triton
    interpreter runs, or ``t`` is not contiguous and 16-byte aligned in address and size (the
    instruction's rule)."""
    if not ENABLED or t is None or triton_interpret() or not hopper_or_later(t.device) or not t.is_contiguous():
        return 0, 0
    nbytes = t.numel() * t.element_size()
    if nbytes == 0 or nbytes % 16 or t.data_ptr() % 16:
        return 0, 0
    return nbytes, min(PROGRAMS, -(-nbytes // CHUNK))


def prefetch_l2_(t: torch.Tensor | None) -> bool:
    """Fork a prefetch of ``t`` into L2 onto ``t``'s device's side stream, after the work already queued
    on the current stream; returns whether it did (see :func:`prefetch_plan`). Pair with
    :func:`join_prefetches` before the step ends."""
    if t is None:
        return False
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"prefetch_l2_ takes a tensor (or None), got {type(t).__name__}")
    nbytes, programs = prefetch_plan(t)
    if programs == 0:
        return False
    from kimi_linear.ops.prefetch_kernel import launch_prefetch

    side = _side_streams.get(t.device)
    if side is None:
        side = _side_streams[t.device] = torch.cuda.Stream(t.device)
    side.wait_stream(torch.cuda.current_stream(t.device))
    with torch.cuda.device(t.device), torch.cuda.stream(side):  # Triton launches on the current device
        launch_prefetch(t, nbytes, programs, CHUNK)
    _pending[t.device] = torch.cuda.is_current_stream_capturing()
    return True


def join_prefetches(device: torch.device | None = None) -> None:
    """The current stream of ``device`` (every device with forked prefetches when None) waits for them.
    In a CUDA-graph capture only prefetches forked in a capture are joined (a capture cannot wait on work
    queued outside it); prefetches forked outside one are then dropped from the books, left to run."""
    for dev in [d for d in _pending if device is None or d == device]:
        if _pending.pop(dev) == torch.cuda.is_current_stream_capturing():
            torch.cuda.current_stream(dev).wait_stream(_side_streams[dev])
