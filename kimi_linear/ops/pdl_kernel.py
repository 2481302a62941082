"""The in-kernel half of programmatic dependent launch (:mod:`kimi_linear.ops.pdl`); imported lazily
(needs Triton)."""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@triton.jit
def wait_for_previous_grid(PDL: tl.constexpr):
    """First statement of a kernel launched with ``launch_pdl=PDL``: wait until the previous grid has
    completed and its writes are visible, then let the next kernel's programs be placed. A no-op when
    ``PDL`` is False (the Triton interpreter, GPUs before Hopper, the switch off)."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


@triton.jit
def prefetch_l2(ptrs):
    """Ask L2 to fetch the 128-byte line of every address in ``ptrs`` (a tensor of pointers of any
    shape; every address must be valid). No result, nothing waits for it: a kernel issues this for
    weights it will read, before :func:`wait_for_previous_grid`, so they stream in while the previous
    kernel finishes. Compiled code only (inline PTX): callers guard it with their ``PREFETCH``."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1]; // dummy $0", "=r,l", [ptrs], dtype=tl.int32,
                              is_pure=False, pack=1)
