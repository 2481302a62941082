"""L2 prefetch of the next kernels' weights from the extra programs of a latency-bound decode kernel.

At batch 1 a decode step alternates kernels that stream weights from HBM (the projections, bound by
bandwidth) with short kernels bound by their own chain of loads, reductions and stores (the KDA
recurrence, the per-head norm, the latent cache write), during which HBM is mostly idle. A kernel of
the second kind can take a few more programs whose only work is to ask the L2 for a tensor that a later
kernel of the step reads (``cp.async.bulk.prefetch.L2``, Hopper's bulk-copy engine: one instruction per
16 KB, no registers, nothing waited for), so that the later kernel finds it in the 50 MB L2.

Safe anywhere in a step: a prefetch reads memory and writes nothing visible, and the tensors prefetched
are weights, which no kernel of a decode step writes. It is a hint: results are bit-identical with it on
and off (tested); whether it pays is measured (docs/decode.md, "L2 prefetch of the output projections").

| name               | meaning                                                                        |
|--------------------|--------------------------------------------------------------------------------|
| ``ENABLED``        | global switch (benchmarks turn it off for an A/B in one process)                |
| ``CHUNK``          | bytes per prefetch instruction                                                   |
| ``prefetch_plan``  | ``(tensor, device, lanes, programs_per_row)`` -> ``(tensor, nbytes, rows)`` for   |
|                    | a kernel's extra programs; ``rows`` 0 when off or not possible                   |
"""

from __future__ import annotations

import torch

from kimi_linear.backends import triton_interpret
from kimi_linear.ops.pdl import hopper_or_later

__all__ = ["CHUNK", "ENABLED", "prefetch_plan"]

ENABLED = True
CHUNK = 16384


def prefetch_plan(t: torch.Tensor | None, device: torch.device, lanes: int,
                  programs_per_row: int = 1) -> tuple[torch.Tensor | None, int, int]:
    """How many extra rows of programs a kernel adds to prefetch ``t`` into L2.

    ``lanes``: prefetch instructions one program issues at a time (its threads); ``programs_per_row``:
    programs in one row of the kernel's grid (the extra programs come as whole rows). Returns
    ``(t, nbytes, rows)``; ``rows`` is 0 (and the kernel compiles without the prefetch) when the switch
    is off, there is nothing to prefetch, the device is not Hopper or later (the instruction is sm_90's),
    the Triton interpreter runs, or ``t`` is not 16-byte aligned in address and size (the instruction's
    rule).
    """
    if (not ENABLED or t is None or triton_interpret() or not hopper_or_later(device) or t.device != device
            or not t.is_contiguous()):
        return None, 0, 0
    nbytes = t.numel() * t.element_size()
    if nbytes == 0 or nbytes % 16 or t.data_ptr() % 16:
        return None, 0, 0
    programs = -(-nbytes // (CHUNK * lanes))
    return t, nbytes, -(-programs // programs_per_row)
