"""SparseMoeBlock: output vs a per-token reference, load statistics, balancing update, fp32 bias."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kimi_linear.layers.moe import SparseMoeBlock
from tests.layers.util import small_config


def make(**over):
    block = SparseMoeBlock(small_config(num_experts=6, num_experts_per_token=2, **over)).double()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.3)
        block.gate.e_score_correction_bias.normal_(0, 0.2)
    return block


def test_output_matches_per_token_reference():
    block = make()
    x = torch.randn(3, 7, 32, dtype=torch.float64)
    y = block(x)
    flat = x.reshape(-1, 32)
    ref = torch.zeros_like(flat)
    for n in range(flat.shape[0]):
        s = torch.sigmoid(block.gate.weight.double() @ flat[n])
        chosen = torch.topk(s + block.gate.e_score_correction_bias.double(), 2).indices
        w = s[chosen] / s[chosen].sum() * block.scaling
        for e, wt in zip(chosen.tolist(), w):
            ex = block.experts[e]
            ref[n] += wt * ex.w2(F.silu(ex.w1(flat[n])) * ex.w3(flat[n]))
        sh = block.shared_experts
        ref[n] += sh.down_proj(F.silu(sh.gate_proj(flat[n])) * sh.up_proj(flat[n]))
    torch.testing.assert_close(y, ref.view_as(y), rtol=1e-6, atol=1e-6)  # router logits are fp32 by design


def test_load_statistics_and_balancing_update():
    block = make()
    x = torch.randn(4, 5, 32, dtype=torch.float64)
    block.eval()
    block(x)
    assert block.expert_load.sum() == 0  # eval: nothing counted
    block.train()
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[0, :2] = False
    block(x, attention_mask=mask)
    load = block.expert_load.clone()
    assert load.sum() == 2 * mask.sum()  # top-2 per real token
    bias_before = block.gate.e_score_correction_bias.clone()
    used = block.update_correction_bias(0.01)
    assert torch.equal(used, load) and block.expert_load.sum() == 0
    delta = block.gate.e_score_correction_bias - bias_before
    expected = 0.01 * torch.sign(load.mean() - load)
    torch.testing.assert_close(delta.float(), expected.float())
    assert (delta[load > load.mean()] < 0).all()  # overloaded experts get picked less


def test_bias_update_evens_out_the_load():
    torch.manual_seed(1)
    block = make()
    with torch.no_grad():
        block.gate.e_score_correction_bias.zero_()
        block.gate.weight[0] += 1.0  # expert 0 wins most tokens
    block.train()
    x = torch.randn(64, 32, dtype=torch.float64)
    first = None
    for _ in range(300):
        block(x[None])
        load = block.update_correction_bias(0.01)
        first = load if first is None else first
    assert load.max() - load.min() < first.max() - first.min()


def test_bias_stays_fp32_in_bf16():
    block = SparseMoeBlock(small_config()).bfloat16()
    assert block.gate.e_score_correction_bias.dtype == torch.float32
    assert block.gate.weight.dtype == torch.bfloat16
    y = block(torch.randn(2, 3, 32).bfloat16())
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()


def test_packed_experts_are_views_with_the_same_output_and_training():
    """pack_experts_ moves the experts into two buffers: the grouped path's stacked view exists (no copy),
    forward outputs are bit-identical, names are unchanged, a second call does nothing, and training
    still updates the weights through the views."""
    from kimi_linear.ops.moe import stacked_view

    block = make()
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    before = block(x)
    names = [n for n, _ in block.named_parameters()]
    pairs = lambda: [t for e in block.experts for t in (e.w1.weight, e.w3.weight)]  # noqa: E731
    assert stacked_view(pairs()) is None
    assert stacked_view([]) is None and stacked_view([torch.zeros(3)]) is None  # not a list of matrices
    assert block.pack_experts_() is True
    assert block.pack_experts_() is False  # already packed
    assert [n for n, _ in block.named_parameters()] == names
    w13, w2 = stacked_view(pairs()), stacked_view([e.w2.weight for e in block.experts])
    assert w13 is not None and w2 is not None
    assert w13.data_ptr() == block.experts[0].w1.weight.data_ptr()
    assert torch.equal(w13.view(6, -1, 32)[3, 16:], block.experts[3].w3.weight)  # I = 16 (small_config)
    assert torch.equal(block(x), before)
    opt = torch.optim.SGD(block.parameters(), lr=0.1)
    block(x).square().sum().backward()
    opt.step()
    assert not torch.equal(block(x), before)  # the step moved the experts' weights ...
    assert stacked_view(pairs()) is not None  # ... in place, still packed


def test_packed_experts_save_and_load(tmp_path):
    from kimi_linear.model import KimiLinearConfig, KimiLinearForCausalLM
    from kimi_linear.model.checkpoint import save_pretrained

    torch.manual_seed(0)
    model = KimiLinearForCausalLM(KimiLinearConfig.preset("tiny-moe", vocab_size=61)).eval()
    ids = torch.randint(0, 61, (1, 9))
    want = model(ids).logits
    assert model.pack_experts_() > 0
    save_pretrained(model, tmp_path / "m")
    again = KimiLinearForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert torch.equal(again(ids).logits, want)
