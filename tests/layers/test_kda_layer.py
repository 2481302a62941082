"""KimiDeltaAttention: wiring against a from-scratch computation, padding, causality, variants, dtypes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kimi_linear.layers.kda import KimiDeltaAttention
from kimi_linear.ops.kda.reference import recurrent_decay_ref, recurrent_gdn_ref, recurrent_kda_ref
from tests.layers.util import small_config
from tests.numerics import assert_close


def make(variant="kda", dtype=torch.float64, **over):
    layer = KimiDeltaAttention(small_config(kda_variant=variant, **over), layer_idx=0, backend="reference")
    with torch.no_grad():  # larger weights than the init so every path visibly matters
        for name, p in layer.named_parameters():
            if name.endswith("proj.weight"):
                p.normal_(0, 0.4)
    return layer.to(dtype)


def by_hand(layer, x, variant="kda"):
    """The layer's math spelled out with the token-by-token reference operators."""
    B, T, _ = x.shape
    H, K = layer.num_heads, layer.head_k_dim

    def conv(p, c):
        y = F.conv1d(F.pad(p(x).transpose(1, 2), (3, 0)), c.weight, groups=c.weight.shape[0])
        return F.silu(y).transpose(1, 2).reshape(B, T, H, K)

    q, k, v = conv(layer.q_proj, layer.q_conv1d), conv(layer.k_proj, layer.k_conv1d), conv(layer.v_proj, layer.v_conv1d)
    q = q / torch.sqrt((q * q).sum(-1, keepdim=True) + 1e-6)
    k = k / torch.sqrt((k * k).sum(-1, keepdim=True) + 1e-6)
    raw = layer.f_b_proj(layer.f_a_proj(x)).double()
    A = layer.A_log.double().exp().view(H, 1)
    beta = torch.sigmoid(layer.b_proj(x).double())
    if variant == "gdn":
        g = -A.view(H) * F.softplus(raw + layer.dt_bias.double())
        o, _ = recurrent_gdn_ref(q, k, v, g, beta)
    else:
        g = -A * F.softplus(raw.view(B, T, H, K) + layer.dt_bias.double().view(H, K))
        o, _ = (recurrent_decay_ref if variant == "decay" else recurrent_kda_ref)(q, k, v, g, beta)
    gate = layer.g_b_proj(layer.g_a_proj(x)).view(B, T, H, K)
    normed = o / torch.sqrt(o.pow(2).mean(-1, keepdim=True) + layer.eps) * layer.o_norm.weight
    return layer.o_proj((normed * torch.sigmoid(gate)).reshape(B, T, H * K))


@pytest.mark.parametrize("variant", ["kda", "gdn", "decay"])
def test_layer_matches_by_hand(variant):
    layer = make(variant)
    x = torch.randn(2, 70, 32, dtype=torch.float64)  # > one 64-token chunk
    assert_close(layer(x), by_hand(layer, x, variant), "ref", torch.float64, f"{variant} layer")


def test_parameter_names_and_shapes():
    layer = KimiDeltaAttention(small_config())
    shapes = {n: tuple(p.shape) for n, p in layer.named_parameters()}
    assert shapes == {
        "q_proj.weight": (16, 32), "k_proj.weight": (16, 32), "v_proj.weight": (16, 32),
        "q_conv1d.weight": (16, 1, 4), "k_conv1d.weight": (16, 1, 4), "v_conv1d.weight": (16, 1, 4),
        "f_a_proj.weight": (8, 32), "f_b_proj.weight": (16, 8), "A_log": (1, 1, 2, 1), "dt_bias": (16,),
        "b_proj.weight": (2, 32), "g_a_proj.weight": (8, 32), "g_b_proj.weight": (16, 8), "o_norm.weight": (8,),
        "o_proj.weight": (32, 16),
    }
    gdn = dict(KimiDeltaAttention(small_config(kda_variant="gdn")).named_parameters())
    assert gdn["f_b_proj.weight"].shape == (2, 8) and gdn["dt_bias"].shape == (2,)


def test_gate_params_stay_fp32_and_init_spread():
    layer = KimiDeltaAttention(small_config(linear_attn_config={
        "full_attn_layers": [3], "head_dim": 8, "kda_layers": [1, 2, 4], "num_heads": 4})).bfloat16()
    assert layer.A_log.dtype == torch.float32 and layer.dt_bias.dtype == torch.float32
    assert layer.q_proj.weight.dtype == torch.bfloat16
    A = layer.A_log.exp().flatten()
    torch.testing.assert_close(A.min(), torch.tensor(1.0))
    torch.testing.assert_close(A.max(), torch.tensor(16.0))
    dt = F.softplus(layer.dt_bias)
    assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 1e-1 * 1.001 and dt.max() / dt.min() > 5
    x = torch.randn(2, 9, 32).bfloat16()
    y = layer(x)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()


@pytest.mark.parametrize("variant", ["kda", "gdn"])
def test_padding_left_and_right_does_not_leak(variant):
    layer = make(variant)
    a = torch.randn(1, 6, 32, dtype=torch.float64)
    b = torch.randn(1, 9, 32, dtype=torch.float64)
    ya, yb = layer(a), layer(b)
    junk = torch.randn(1, 3, 32, dtype=torch.float64) * 50
    left = torch.cat([torch.cat([junk, a], 1), b])
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, :3] = 0
    y = layer(left, attention_mask=mask)
    torch.testing.assert_close(y[0, 3:], ya[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(y[1], yb[0], rtol=1e-10, atol=1e-10)
    right = torch.cat([torch.cat([a, junk], 1), b])
    y = layer(right, attention_mask=mask.flip(1))
    torch.testing.assert_close(y[0, :6], ya[0], rtol=1e-10, atol=1e-10)


def test_pads_do_not_touch_the_state():
    layer = make()
    x = torch.randn(1, 8, 32, dtype=torch.float64)
    q, k, v, _ = layer.project_qkv(x)
    _, s_ref = layer._attend(q, k, v, x, output_final_state=True)
    xp = torch.cat([x, torch.randn(1, 4, 32, dtype=torch.float64)], 1)
    mask = torch.tensor([[1] * 8 + [0] * 4], dtype=torch.bool)
    xp = xp * mask[..., None]
    q, k, v, _ = layer.project_qkv(xp)
    _, s = layer._attend(q, k, v, xp, mask, output_final_state=True)
    torch.testing.assert_close(s, s_ref, rtol=1e-12, atol=1e-12)


def test_causal_and_varlen():
    layer = make()
    x = torch.randn(1, 20, 32, dtype=torch.float64)
    y = layer(x)
    x2 = x.clone()
    x2[:, 12:] += 10
    assert torch.equal(layer(x2)[:, :12], y[:, :12])
    parts = [torch.randn(1, n, 32, dtype=torch.float64) for n in (5, 1, 11)]
    cu = torch.tensor([0, 5, 6, 17], dtype=torch.int32)
    packed = layer(torch.cat(parts, 1), cu_seqlens=cu)
    for i, p in enumerate(parts):
        torch.testing.assert_close(packed[:, cu[i]:cu[i + 1]], layer(p), rtol=1e-10, atol=1e-10)


def test_gradients_reach_every_parameter():
    layer = make(dtype=torch.float32)
    layer(torch.randn(2, 10, 32)).square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_bad_input():
    layer = make()
    with pytest.raises(ValueError, match="attention_mask must be"):
        layer(torch.randn(1, 3, 32, dtype=torch.float64), attention_mask=torch.ones(1, 4))


@pytest.mark.gpu
def test_triton_backend_equals_reference(cuda_device):
    """The fused Triton path (in-kernel L2 norm / gate / beta) against the reference path, shared weights."""
    ref = make(dtype=torch.float32, linear_attn_config={  # kernel tiles need K >= 16
        "kda_layers": [1, 2, 4], "full_attn_layers": [3], "head_dim": 32, "num_heads": 2}).to(cuda_device)
    x = torch.randn(2, 200, 32, device=cuda_device, requires_grad=True)
    mask = torch.ones(2, 200, dtype=torch.long, device=cuda_device)
    mask[1, :37] = 0
    for m in (None, mask):
        ref.backend = "reference"
        y_ref = ref(x, attention_mask=m)
        g_ref = torch.autograd.grad(y_ref.sum(), [x, ref.A_log, ref.dt_bias])
        ref.backend = "triton"
        y = ref(x, attention_mask=m)  # the Triton chunk_kda exists: a NotImplementedError here is a failure
        g = torch.autograd.grad(y.sum(), [x, ref.A_log, ref.dt_bias])
        assert_close(y, y_ref, "layer", torch.float32, "triton layer output")
        for a, b, n in zip(g, g_ref, ("x", "A_log", "dt_bias")):
            assert_close(a, b, "layer", torch.float32, f"grad {n}")


@pytest.mark.parametrize("variant", ["kda", "gdn"])
def test_triton_backend_equals_reference_interpreted(variant):
    """The layer's Triton path (fused L2 norm / gate / beta; unfused gate under padding) on CPU through
    Triton's interpreter, against the reference path with shared weights: outputs and gradients."""
    if torch.cuda.is_available():
        pytest.skip("on a GPU the compiled kernels are tested by the gpu-marked test")
    import tests.ops.conftest  # noqa: F401  sets TRITON_INTERPRET=1 (+ its NumPy patch) before kernels load
    from kimi_linear.backends import triton_usable_on

    if not triton_usable_on(torch.device("cpu")):
        pytest.skip("Triton interpreter unavailable")
    layer = make(variant, dtype=torch.float32, linear_attn_config={
        "kda_layers": [1, 2, 4], "full_attn_layers": [3], "head_dim": 16, "num_heads": 2})
    x = torch.randn(2, 70, 32, requires_grad=True)
    mask = torch.ones(2, 70, dtype=torch.long)
    mask[1, :9] = 0
    for m in (None, mask) if variant == "kda" else (mask,):
        outs = {}
        for backend in ("reference", "triton"):
            layer.backend = backend
            y = layer(x, attention_mask=m)
            outs[backend] = (y, *torch.autograd.grad(y.square().sum(), [x, layer.A_log, layer.dt_bias]))
        for name, a, b in zip(("y", "dx", "dA_log", "ddt_bias"), outs["triton"], outs["reference"]):
            # the interpreter's dots are true fp32: no tf32 allowance (dA_log, a per-head sum with heavy
            # cancellation, keeps the layer bound; see tests/ops/test_chunk_kda.py)
            kind = "layer" if name == "dA_log" else "kernel_interp"
            assert_close(a, b, kind, torch.float32, f"{variant} {name} mask={m is not None}")
