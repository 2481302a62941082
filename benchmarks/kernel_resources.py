"""Registers, spills and shared memory of our Triton kernels for an H100 (sm_90a), without a GPU.

Compiles each kernel with Triton's own compiler for ``GPUTarget("cuda", 90, 32)`` and runs the
``ptxas`` Triton ships with ``-v`` on the PTX. This is how register pressure was found to be the
limit of several chunked-KDA kernels (docs/kernels.md, v5-v7): a kernel at 255 registers with spills
runs few programs per SM, and no launch setting fixes that.

    PYTHONPATH=. python benchmarks/kernel_resources.py            # all
    PYTHONPATH=. python benchmarks/kernel_resources.py decay scan  # names containing these
    PYTHONPATH=. python benchmarks/kernel_resources.py --aligned   # pointers 16-byte aligned, as launched

Each line also counts the PTX's global loads, vector against scalar.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

# pointer arguments that are not fp32 at the benchmark shapes (bf16 inputs, the launch table's defaults:
# dW and the dq / dk parts bf16 by half_store); everything else that is not a constexpr is an fp32
# pointer, except the scalars listed here
TYPES = {n: "*bf16" for n in ("q", "k", "v", "g", "beta", "Qg", "Kd", "Wk", "U", "W", "h", "do", "dh", "dv", "dg", "dW", "dq", "dk",
                              "dbeta", "o", "dq_out", "dk_out", "x", "window", "weight", "y", "gate")}
TYPES.update({n: "*i32" for n in ("chunk_start", "chunk_len", "chunk_first", "seq_start", "counter")})
TYPES.update(tab_ptr="*i64", conv_tab="*i64", OUT="i32", SX="i32")
TYPES.update(scale="fp32", eps="fp32", scaling="fp32", R="i32", E="i32", D="i32", TOT="i32", stride_xb="i64",
             T="i32", stride_xt="i64", final="*bf16")
TYPES.update(indices="*i64", logits="*fp32", w_gate="*bf16", x_ptr="*bf16", h_ptr="*bf16", idx_ptr="*i32", w1_tab="*i64",
             w3_tab="*i64", w2_tab="*i64", cw_ptr="*fp32", y_ptr="*fp32", N="i32", I="i32", NK="i32", ER="i32", K="i32")
# the decode step's folded block norms: norm weights and residuals in the model's dtype
TYPES.update(nw_ptr="*bf16", norm_w="*bf16", res_ptr="*bf16")
TYPES.update(NC="i32", NGATE="i32", TT="i32")  # chunk and program counts, tokens
# the absorbed-MLA split kernels: bf16 queries and cache, int64 lengths, int32 sizes and strides (names
# such as M are pointers in other kernels: these types apply to the latent kernels only)
LATENT_TYPES = dict(q_lat_ptr="*bf16", q_rope_ptr="*bf16", c_ptr="*bf16", kr_ptr="*bf16", len_ptr="*i64", L="i32",
                    M="i32", T="i32", H="i32", keys_per_split="i32", sm_scale="fp32")
LATENT_TYPES.update({f"stride_{n}": "i32" for n in ("qb", "qm", "qrb", "qrm", "cb", "cl", "krb", "krl", "ob", "os",
                                                     "om", "lb", "ls", "cm")})
LATENT_TYPES.update(S="i32", ctx_ptr="*bf16")  # the merge: split count, bf16 contexts (fp32 partials: the default)

# kernel-specific tables (by the kernel's name prefix) override TYPES for that kernel only
# the absorbed MLA projections at decode: bf16 queries, weights, contexts and outputs
ABSORB_TYPES = dict(q_ptr="*bf16", w_ptr="*bf16", out_ptr="*bf16", c_ptr="*bf16", N="i32", s_qn="i32", s_qh="i32")
KERNEL_TYPES = {"_latent_attn": LATENT_TYPES, "_absorb": ABSORB_TYPES}


# --aligned: pointer arguments 16-byte aligned and integer arguments multiples of 16, as Triton
# specialises a real launch's when they are (the benchmark shapes' dimensions are)
ALIGNED = False


def compile_sm90(fn, constexprs: dict, num_warps: int, num_stages: int = 3):
    """``fn`` compiled by Triton for sm_90a with these constexprs (decode kernels with PDL on, as launched
    on Hopper); argument types from TYPES / KERNEL_TYPES. The compiled kernel (``.asm["ptx"]`` ...)."""
    options = dict(num_warps=num_warps, num_stages=num_stages)
    # constexpr parameters with a default take it, as a launch that does not pass them does (typed as
    # pointers they would not compile)
    constexprs = {**{p.name: p.default for p in fn.params if p.is_constexpr and p.has_default}, **constexprs}
    if "PDL" in fn.arg_names and "PDL" not in constexprs:  # decode kernels: as launched on Hopper (ops/pdl.py)
        constexprs = dict(constexprs, PDL=True)
        options["launch_pdl"] = True
    types = dict(TYPES, **next((t for pre, t in KERNEL_TYPES.items() if fn.__name__.startswith(pre)), {}))
    sig = {name: "constexpr" if name in constexprs else types.get(name, "*fp32") for name in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if ALIGNED and (sig[name].startswith("*") or sig[name] in ("i32", "i64"))}
    return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs),
                          target=GPUTarget("cuda", 90, 32), options=options)


def compile_stats(fn, constexprs: dict, num_warps: int, num_stages: int = 3) -> str:
    kernel = compile_sm90(fn, constexprs, num_warps, num_stages)
    ptx = kernel.asm["ptx"]
    # global loads in the PTX: vector (16/8-byte) against scalar ones; a weight-streaming kernel with
    # many scalar loads has lost its address alignment (docs/decode.md)
    vec = len(re.findall(r"ld\.global(?:\.\w+)*\.v[24]\.", ptx))
    scalar = len(re.findall(r"ld\.global(?:\.\w+)*\.[bfsu](?:8|16|32|64) ", ptx))
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        err = subprocess.run([ptxas, "-arch=sm_90a", "-v", f.name, "-o", os.devnull], capture_output=True, text=True).stderr
    finally:
        os.unlink(f.name)
    regs = next((ln.split("Used")[1].split(",")[0].strip() for ln in err.splitlines() if "Used" in ln), "?")
    spill = next((ln.split("stack frame,")[1].strip() for ln in err.splitlines() if "spill" in ln), "?")
    return f"{regs}, {spill}, shared {kernel.metadata.shared} B; global loads: {vec} vector, {scalar} scalar"


def cases():
    """(label, kernel, constexprs, warps, stages) at the H100 benchmark shapes (H = 16, K = V = 128)."""
    from kimi_linear.ops import conv_kernel, moe_route_kernel, norm_kernel
    from kimi_linear.ops.kda import chunk_bwd as cb
    from kimi_linear.ops.kda import chunk_fwd as cf
    from kimi_linear.ops.kda.chunk_common import LAUNCH

    hk = dict(H=16, HV=16, K=128)
    dg, gd = LAUNCH["decay_grad"], LAUNCH["gram_diag"]
    # NORM: the fused q/k norm applied on load (l2norm on_load); BASE2: G in units of log2 (gate base2), both
    # only in a forward without backward, so the inference forward's kernels have both
    for norm, b2 in ((0, 0), (1, 0), (1, 1)):
        yield (f"gram (off-diagonal) norm={norm} base2={b2}", cf._gram_kernel,
               dict(hk, KP=128, BK=32, PREC="tf32", NORM=norm, BASE2=b2), 4, 3)
        yield (f"gram diagonal BH={gd['BH']} norm={norm} base2={b2}", cf._gram_diag_kernel,
               dict(hk, KP=128, BH=gd["BH"], NORM=norm, BASE2=b2), gd["num_warps"], 3)
    for w in (1, 2, 4):
        yield "solve: inverse", cf._inverse_kernel, dict(HV=16, BETA_SIGMOID=False, PREC="tf32"), w, 1
    for bk, w, st in ((32, 1, 3), (16, 1, 3), (32, 2, 3), (32, 4, 3)):  # the off-diagonal gram + inverse
        for norm, b2 in ((0, 0), (1, 1)):
            yield (f"gram + inverse BK={bk} norm={norm} base2={b2}", cf._gram_solve_kernel,
                   dict(hk, KP=128, BK=bk, PREC="tf32", NORM=norm, BETA_SIGMOID=True, STORE_ARAW=not norm, BASE2=b2),
                   w, st)
    for bv, w in ((32, 4), (64, 4), (64, 8)):
        for norm, b2 in ((0, 0), (1, 0), (1, 1)):
            yield (f"solve: products BV={bv} norm={norm} base2={b2}", cf._wu_kernel,
                   dict(hk, V=128, BV=bv, NB=128 // bv, BETA_SIGMOID=False, PREC="tf32", NORM=norm, BASE2=b2), w, 1)
    for bv, w, s in ((16, 8, 3), (64, 4, 2)):
        for out in (0, 1):
            yield (f"state scan BV={bv} output={out}", cf._state_fwd_kernel,
                   dict(HV=16, K=128, V=128, KP=128, BV=bv, HAS_INIT=False, STORE_FINAL=False, OUTPUT=out, PREC="tf32"), w, s)
    for bv, w, s in ((16, 4, 3), (64, 4, 2)):
        for d in (0, 1):
            yield (f"state-gradient scan BV={bv} dw_local={d}", cb._state_bwd_kernel,
                   dict(HV=16, K=128, V=128, KP=128, BV=bv, HAS_DHT=False, STORE_DH0=False, PREC="tf32", DW_LOCAL=d), w, s)
    yield "dw_local", cb._dw_local_kernel, dict(HV=16, V=128, BV=64, PREC="tf32"), 4, 3
    for bk, bv, apart, half in ((64, 32, 0, 0), (32, 32, 0, 0), (64, 32, 1, 0), (64, 64, 1, 0), (64, 64, 1, 1)):
        yield (f"chunk grads BK={bk} BV={bv}{' v_apart' if apart else ''}{' half_dots' if half else ''}",
               cb._chunk_grad_kernel,
               dict(hk, V=128, BK=bk, BV=bv, BETA_SIGMOID=False, PREC="tf32", V_APART=apart, HALF_DOTS=half), 8, 3)
    for prec in ("tf32", "tf32split", "tf32x3"):
        for fac in (0, 1, 2, 3):
            for rolled in (False, True):
                yield (f"decay products {prec} factored={fac}{' rolled' if rolled else ''}", cb._decay_grad_kernel,
                       dict(hk, BK=dg["BK"], PREC=prec, FACTORED=fac, ROLLED=rolled), dg["num_warps"], dg["num_stages"])
    yield "gate grads", cb._gate_grad_kernel, dict(HV=16, K=128, BK=32, NKB=4, GATE_FROM_RAW=True, FLOOR=-800.0), 4, 3
    yield "gate parameter sums", cb._gate_param_sum_kernel, dict(HV=16, K=128, KP=128, NKB=4, NKBP=4, BC=16), 4, 3
    yield "l2norm (q and k)", cf._l2norm_fwd_kernel, dict(D=128, DP=128, BR=16), 4, 3
    yield "q/k norms' rstd (norm on load)", cf._rstd_kernel, dict(H=16, K=128, KP=128, BT=cf.RSTD_ROWS), 4, 3
    yield ("gate cumsum + rstd (one launch)", cf._rstd_prologue_kernel,
           dict(HV=16, K=128, BK=64, NKB=2, GATE_FROM_RAW=True, FLOOR=-800.0, H=16, KP=128, BT=cf.RSTD_ROWS), 4, 3)
    yield ("gate cumsum + l2norm (one launch)", cf._prologue_kernel,
           dict(HV=16, K=128, BK=64, NKB=2, GATE_FROM_RAW=True, FLOOR=-800.0, D=128, DP=128, BR=16), 4, 3)
    yield ("gate grads + l2norm backward (one launch)", cb._epilogue_kernel,
           dict(HV=16, K=128, BK=32, NKB=4, GATE_FROM_RAW=True, FLOOR=-800.0, D=128, DP=128, BR=16), 4, 3)
    yield "l2norm backward (q and k)", cb._l2norm_bwd_kernel, dict(D=128, DP=128, BR=16), 4, 3
    yield "conv decode step", conv_kernel._conv_update_kernel, dict(W=4, WP=4, BD=128, HAS_BIAS=False, SILU=True), 4, 3
    for win in (False, True):
        yield (f"conv sequence window={int(win)}", conv_kernel._conv_seq_kernel,
               dict(W=4, WP=4, BT=32, BD=128, HAS_WINDOW=win, HAS_BIAS=False, SILU=True, WRITE_FINAL=True), 4, 3)
    yield "rms norm (D=2304)", norm_kernel._rms_norm_fwd_kernel, dict(D=2304, DP=4096, BR=1, GATED=False, RESIDUAL=False), 4, 3
    yield "gated rms norm (D=128)", norm_kernel._rms_norm_fwd_kernel, dict(D=128, DP=128, BR=16, GATED=True, RESIDUAL=False), 4, 3
    from kimi_linear.ops import moe_decode
    gate_up, down = moe_decode._kernels()
    tu, td = moe_decode.TILES["gate_up"], moe_decode.TILES["down"]
    yield "moe decode gate_up", gate_up, dict(BLOCK_N=16, BLOCK_I=tu["BLOCK_I"], BLOCK_D=tu["BLOCK_D"], BLOCK_NK=16,
                                              W_ALIGN=16), tu["num_warps"], tu["num_stages"] or 3
    yield "moe decode down", down, dict(BLOCK_N=16, BLOCK_D=td["BLOCK_D"], BLOCK_I=td["BLOCK_I"], BLOCK_NK=16,
                                        W_ALIGN=16), td["num_warps"], td["num_stages"] or 3
    # batch-1 decode: the one-token expert kernels and the projections (weights found through address
    # tables, declared 16-byte aligned: W_ALIGN), at the benchmark's tiles
    gate_up1, down1 = moe_decode._single_token_kernels()
    t1, t2 = moe_decode.TILES["gate_up_one"], moe_decode.TILES["down_one"]
    # (" norm" / " residual": the decode step's folded post-attention norm and residual add, docs/decode.md)
    for norm, early in ((False, False), (True, False), (True, True)):
        yield (f"moe decode gate_up (one token){' norm' if norm else ''}{' early' if early else ''}", gate_up1,
               dict(BLOCK_R=t1["BLOCK_R"], BLOCK_D=t1["BLOCK_D"], EVEN_D=True, W_ALIGN=16, NORM=norm, EARLY=early,
                    X_CACHE=".cg" if early else ""), t1["num_warps"], 3)
    for res in (False, True):
        yield (f"moe decode down (one token){' residual' if res else ''}", down1,
               dict(J=9, BLOCK_R=t2["BLOCK_R"], BLOCK_I=t2["BLOCK_I"], W_ALIGN=16, RESIDUAL=res), t2["num_warps"], 3)
    from kimi_linear.ops import latent_attention_triton as lat
    # absorbed-MLA decode, 32 heads x (512 + 64), 64-key tiles in 2 stages: rows-major (two 16-row programs
    # per split) and keys-major (one program of all 32 rows; the products transposed)
    for warps in (4, 8):
        yield (f"latent split rows-major BLOCK_M=16 {warps}w", lat._latent_attn_split_kernel,
               dict(R=512, DR=64, BLOCK_M=16, BLOCK_N=64), warps, 2)
        yield (f"latent split keys-major BLOCK_M=32 {warps}w", lat._latent_attn_split_keys_major_kernel,
               dict(R=512, DR=64, BLOCK_M=32, BLOCK_N=64), warps, 2)
        yield (f"latent split keys-major TMA BLOCK_M=32 {warps}w", lat._latent_attn_split_keys_major_kernel,
               dict(R=512, DR=64, BLOCK_M=32, BLOCK_N=64, TMA=True), warps, 2)
    yield ("latent split keys-major TMA 32 keys x 4 stages", lat._latent_attn_split_keys_major_kernel,
           dict(R=512, DR=64, BLOCK_M=32, BLOCK_N=32, TMA=True), 4, 4)
    yield ("latent split keys-major TMA, 1 tile prefetched", lat._latent_attn_split_keys_major_kernel,
           dict(R=512, DR=64, BLOCK_M=32, BLOCK_N=64, TMA=True, PREFETCH_TILES=1, ELT=2), 4, 2)
    yield ("latent merge one pass (132 splits)", lat._latent_attn_merge_one_pass_kernel,
           dict(BLOCK_R=lat.MERGE_TILES["block_r"], BLOCK_S=256), lat.MERGE_TILES["num_warps"], 3)
    from kimi_linear.ops import latent_absorb_triton as ab
    # the absorbed projections around it (32 heads, Dn = Dv = 128, R = 512), at the launch table's tiles
    yield ("absorb query (MLA decode)", ab._absorb_query_kernel,
           dict(H=32, DN=128, DV=128, R=512, BD=128, BR=ab.TILES["BR"]), ab.TILES["num_warps"], 3)
    yield ("absorb output (MLA decode)", ab._absorb_output_kernel,
           dict(H=32, DN=128, DV=128, R=512, RP=512, BV=ab.TILES["BV"]), ab.TILES["num_warps"], 3)
    from kimi_linear.ops import gemv
    # wide: a KDA layer's inputs (with their conv steps), wide_few: the MLA inputs and the output
    # projections; folded: the block's input norm into the inputs, the residual add into the outputs
    for cls, conv, norm, res in (("wide", True, False, False), ("wide_few", False, False, False),
                                 ("wide", True, True, False), ("wide_few", False, True, False),
                                 ("wide_few", False, False, True)):
        t = gemv.NORM_TILES.get(cls, gemv.TILES[cls]) if norm else gemv.TILES[cls]
        yield (f"fused_linear {cls} (D=2304){' norm' if norm else ''}{' residual' if res else ''}", gemv._kernel(),
               dict(NT=1, BLOCK_R=t["BLOCK_R"], BLOCK_D=t["BLOCK_D"], EVEN_D=True, CONV=conv, W=4, WP=4,
                    MULTI_X=False, X_ALIGN=1, W_ALIGN=16, NORM=norm, RESIDUAL=res), t["num_warps"], 3)
    # routing from given logits (the released model's 256 experts), or with the router's logits computed
    # inside (decode, <= 64 tokens and <= 32 experts: the decode benchmark's 16 and the limit), D = 2304
    for e, hidden in ((256, False), (16, True), (32, True)):
        yield (f"moe route (E={e}, k=8) from_hidden={int(hidden)}", moe_route_kernel._route_kernel,
               dict(EP=e, TOPK=8, KP=8, HAS_BIAS=True, RENORM=True, FROM_HIDDEN=hidden,
                    BLOCK_D=moe_route_kernel.hidden_block_d(e, 2304)),
               moe_route_kernel.HIDDEN_TILE["num_warps"] if hidden else 1, 3)
    for e, norm in ((16, False), (32, False), (16, True)):  # the split router's slice programs at D = 2304
        block, nsplit = moe_route_kernel.split_plan(e, 2304)
        yield (f"moe route split (E={e}, k=8) {nsplit} x {block}{' norm' if norm else ''}",
               moe_route_kernel._route_split_kernel,
               dict(EP=e, TOPK=8, KP=8, HAS_BIAS=True, RENORM=True, BLOCK_D=block, NSPLIT=nsplit,
                    SP=triton.next_power_of_2(nsplit), NORM=norm), moe_route_kernel.SPLIT_WARPS, 3)


def main() -> None:
    global ALIGNED
    wanted = [a for a in sys.argv[1:] if a != "--aligned"]
    ALIGNED = "--aligned" in sys.argv[1:]
    for label, fn, ce, warps, stages in cases():
        if wanted and not any(w in label for w in wanted):
            continue
        print(f"{label:42s} {warps} warps, {stages} stages: {compile_stats(fn, ce, warps, stages)}", flush=True)


if __name__ == "__main__":
    main()
