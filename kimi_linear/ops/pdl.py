"""Programmatic dependent launch (PDL) for the decode step's Triton kernels (Hopper and later).

A batch-1 decode step is ~240 kernels of a few to ~30 us, each bound by reading its weights. In a
stream (or a CUDA graph) a kernel normally starts only when the one before it has finished: the GPU
then drains the last programs of one kernel, and ramps up the next one's, with the memory system
partly idle in between, ~240 times per token.

With PDL (``launch_pdl=True``, CUDA's programmatic stream serialization) a kernel's programs may be
placed on the SMs while its predecessor still runs. Each of our kernels launched this way starts
with :func:`kimi_linear.ops.pdl_kernel.wait_for_previous_grid`: ``griddepcontrol.wait`` blocks the
program until the previous grid has completed and its writes are visible, then
``griddepcontrol.launch_dependents`` lets the next kernel be placed. Nothing that a kernel writes
is read, and nothing is written, before the wait, so every read sees what the stream order promises;
since each kernel waits for the one before, which waited for its own predecessor, only the kernel
just before can still be running when one starts, and the order holds transitively. A kernel
launched without PDL (cuBLAS, PyTorch) waits for full completion as always. What is gained is the
placement and start-up of the next kernel's programs overlapping the previous kernel's tail.

One exception, on the caller's promise: ``moe_decode(x_ready=True)`` (the MoE block, whose router
launch just read the same x) lets the one-token kernel's shared-expert programs run before their
wait -- they read only x (from L2) and weights, write their own fresh buffer, and wait at their end,
so the grid still completes after its predecessor.

Measured on an H100 (benchmark model, batch 1, graph-replayed step; results/decode/session12/):
2.977 -> 2.904 ms at 4K context, 3.439 -> 3.381 at 128K. Also tried and removed: the projections and
the shared expert issuing L2 prefetches of their weight rows before the wait (weights are written by
no kernel of a decode step, so that is safe): 256 B per row neutral, 1 KB +0.8%, whole rows +5%
(the prefetched rows of the 58 MB KDA input projection outrun the 50 MB L2 and are fetched twice).
Session 26: parameters loaded into registers before the wait (the split router's weight slice, the
absorptions' weight tiles, the projections' launch-table entry and first D-slice; SASS checked: the loads
precede the wait) -- every kernel together 2.808 -> 2.817 ms at 4K, 3.018 -> 3.025 at 64K, 3.194 -> 3.202
at 128K, each kernel alone within +-4 us at 64K (results/decode/session26/weights_before_wait_h100.txt;
commit 3199ad4 has the code): a kernel's first loads after the wait are its input and its weights side by
side, so only the difference of their latencies could be saved.

| name          | meaning                                                                              |
|---------------|--------------------------------------------------------------------------------------|
| ``ENABLED``   | global switch (benchmarks turn it off for an A/B in one process)                      |
| ``use_pdl``   | ``device`` -> whether launches on it take PDL: CUDA, compute capability >= 9, not the  |
|               | Triton interpreter, ``ENABLED``                                                        |
| ``hopper_or_later`` | ``device`` -> CUDA with compute capability >= 9 (also what TMA needs)           |
| ``pdl_launch``| ``device`` -> the launch keywords ``dict(PDL=..., launch_pdl=...)`` for a kernel that    |
|               | takes the ``PDL`` constexpr                                                            |
"""

from __future__ import annotations

import functools

import torch

from kimi_linear.backends import triton_interpret

__all__ = ["EARLY_TRIGGER", "ENABLED", "hopper_or_later", "pdl_launch", "use_pdl"]

ENABLED = True


@functools.cache
def _capable(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def hopper_or_later(device: torch.device) -> bool:
    """Whether ``device`` is a CUDA GPU of compute capability 9 or more (Hopper: PDL, TMA); cached."""
    return device.type == "cuda" and _capable(device.index if device.index is not None else torch.cuda.current_device())


def use_pdl(device: torch.device) -> bool:
    """Whether Triton launches on ``device`` use programmatic dependent launch (module docstring)."""
    return ENABLED and not triton_interpret() and hopper_or_later(device)


# Per kernel: 1 lets the next kernel's programs be placed right after this one's PDL wait (they then
# sit on the SMs until this grid completes), 0 only once this kernel's programs have all exited.
# Measured on an H100, benchmark model, graph-replayed step (results/decode/session24/pdl_trigger_*): early
# for every kernel against at exit for every kernel (every entry 0; session 24 measured it with an
# environment switch, since folded into this table)
# 2.858-2.870 against 2.943 ms at 4K, 3.085-3.089 against 3.180 at 64K. Per kernel (benchmarks/
# pdl_trigger_sweep.sh; ms at 4K, exit -> early): fused_linear 2.886 -> 2.861, route_split 2.915 -> 2.865,
# absorb_query 2.907 -> 2.863, recurrent_kda / rms_norm / rms_norm_store / moe_gate_up_one / absorb_output
# within 0.01 (early kept), but moe_down_one 2.841 -> 2.861 (64K: 3.071 -> 3.088), latent_split 2.858 ->
# 2.864, latent_merge 2.857 -> 2.864 (64K: even), latent_keys_major (64K) 3.090 -> 3.085. Those three at
# exit together: 2.833 ms at 4K, 3.055 at 64K (the all-early step 2.854-2.864 / 3.085-3.088). Why a
# dependent placed early slows some kernels is not measured (the placed programs only wait); the table
# is what the step measured. Session 25: the query absorption before the keys-major split kernel (64K keys and
# more) at exit, the Triton absorptions there then gaining: 3.034 -> 3.025 ms at 64K. Then re-measured
# (session25/pdl_trigger_resweep_h100.txt, early -> exit): latent_keys_major 3.029 -> 3.022 at 64K, 3.209 ->
# 3.194 at 128K, 5.770 -> 5.766 at 1M (now at exit); absorb_query_keys_major 3.038 -> 3.032, latent_merge
# 3.058 -> 3.034, moe_down_one 3.055 -> 3.029 at 64K (kept at exit). Session 29: absorb_query_keys_major early
# again, so that the split kernel's programs, placed while it runs, prefetch their first tiles into L2 before
# their wait (latent_attention_triton.TILES["prefetch_tiles"]): neutral alone, -6 / -8 us at 64K / 128K with it.
EARLY_TRIGGER: dict[str, int] = {
    "conv": 1, "fused_linear": 1, "route": 1, "route_split": 1, "recurrent_kda": 1, "rms_norm": 1,
    "rms_norm_store": 1, "moe_gate_up": 1, "moe_down": 1, "moe_gate_up_one": 1, "moe_down_one": 0,
    "latent_split": 0, "latent_keys_major": 0, "latent_merge": 0, "absorb_query": 1, "absorb_output": 1,
    "absorb_query_keys_major": 1,
}


def pdl_launch(device: torch.device, kernel: str | None = None) -> dict[str, bool]:
    """Launch keywords for a kernel with a ``PDL`` constexpr: the in-kernel wait and the launch
    attribute always go together (a PDL launch without the wait would race its predecessor); with
    ``kernel`` (a key of :data:`EARLY_TRIGGER`) also its ``TRIGGER`` constexpr."""
    on = use_pdl(device)
    kw = dict(PDL=on, launch_pdl=on)
    if kernel is not None:
        kw["TRIGGER"] = bool(EARLY_TRIGGER[kernel])
    return kw
