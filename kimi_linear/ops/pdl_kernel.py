"""The in-kernel half of programmatic dependent launch (:mod:`kimi_linear.ops.pdl`); imported lazily
(needs Triton)."""

from __future__ import annotations

import os

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

# When a program lets the next kernel's programs be placed: right after its wait ("early", the default),
# or only as it exits ("exit": no explicit trigger; the next grid is placed once every program of this
# one has finished), for every kernel at once. Read once at import (a compiled kernel holds it as a
# constant): an A/B runs one process per setting (KIMI_LINEAR_PDL_TRIGGER=exit). Per kernel:
# ops/pdl.py's EARLY_TRIGGER table, through each kernel's TRIGGER constexpr.
EARLY_TRIGGER = tl.constexpr(os.environ.get("KIMI_LINEAR_PDL_TRIGGER", "early") != "exit")


@triton.jit
def wait_for_previous_grid(PDL: tl.constexpr, TRIGGER: tl.constexpr = True):
    """First statement of a kernel launched with ``launch_pdl=PDL``: wait until the previous grid has
    completed and its writes are visible, then let the next kernel's programs be placed. A no-op when
    ``PDL`` is False (the Triton interpreter, GPUs before Hopper, the switch off). ``TRIGGER`` False: no
    explicit trigger, the next kernel is placed when this one's programs have all exited."""
    if PDL:
        gdc_wait()
        if TRIGGER and EARLY_TRIGGER:
            gdc_launch_dependents()
