"""e^x for the chunked-KDA kernels' decays: two SASS instructions per element instead of five.

On sm_90 ``tl.exp`` compiles to ``ex2.approx.f32`` of ``x * log2(e)`` *without* ``.ftz``, and ptxas wraps
that MUFU.EX2 in denormal handling: a compare with -126, a predicated halving of the argument before and
a squaring of the result after (FMUL, FSETP, @P FMUL, MUFU.EX2, @P FMUL). ``tl.math.exp2`` compiles to
the flush-to-zero form, one MUFU.EX2, so ``exp2(x * log2(e))`` is FMUL + MUFU.EX2 (counted in the SASS
of both forms with Triton 3.6's ptxas for sm_90a, session 16). The only difference in value: results
below 2^-126 (e^x for x < -87.3) become 0 instead of a denormal. Every exponent here is a difference
of cumulated log-decays (<= 0 or bounded), so such a factor multiplies q / k entries of size <= 1 and
its product is far below anything fp32 sums keep; exactness for unbounded gates (every exponent <= 0,
nothing overflows) is unchanged. The interpreter computes both forms in numpy.

``KIMI_LINEAR_PLAIN_EXP=1`` in the environment at import compiles ``tl.exp`` instead (the A/B of
docs/kernels.md v16; a compiled kernel reads the switch as a constant).
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

FTZ = tl.constexpr(os.environ.get("KIMI_LINEAR_PLAIN_EXP", "0") in ("", "0"))


@triton.jit
def exp(x):
    """e^x of an fp32 tensor (flush-to-zero below 2^-126)."""
    if FTZ:
        return tl.math.exp2(x * 1.4426950408889634)
    else:
        return tl.exp(x)


@triton.jit
def exp_g(x, BASE2: tl.constexpr):
    """The decay of an exponent ``x`` formed from cumulated gates: ``2^x`` when the gates were cumulated
    in base 2 (``BASE2``: ``x`` is already ``x_e * log2(e)``, one FMUL per element less), else ``e^x``."""
    if BASE2:
        return tl.math.exp2(x)
    else:
        return exp(x)
