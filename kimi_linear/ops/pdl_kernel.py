"""The in-kernel half of programmatic dependent launch (:mod:`kimi_linear.ops.pdl`); imported lazily
(needs Triton)."""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@triton.jit
def wait_for_previous_grid(PDL: tl.constexpr, TRIGGER: tl.constexpr = True):
    """First statement of a kernel launched with ``launch_pdl=PDL``: wait until the previous grid has
    completed and its writes are visible, then let the next kernel's programs be placed. A no-op when
    ``PDL`` is False (the Triton interpreter, GPUs before Hopper, the switch off). ``TRIGGER`` False: no
    explicit trigger, the next kernel is placed when this one's programs have all exited (per kernel:
    ops/pdl.py's ``EARLY_TRIGGER`` table)."""
    if PDL:
        gdc_wait()
        if TRIGGER:
            gdc_launch_dependents()
