"""The causal LM: loss, padding, gradient checkpointing, MoE training hooks, overfitting a batch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kimi_linear.model import KimiLinearConfig, KimiLinearForCausalLM
from tests.layers.util import small_config


def _model(**over):
    torch.manual_seed(0)
    return KimiLinearForCausalLM(small_config(**over), backend="reference")


def test_loss_shifts_labels_and_ignores_minus_100():
    model = _model()
    ids = torch.randint(0, 97, (2, 12))
    labels = ids.clone()
    labels[0, :5] = -100
    out = model(ids, labels=labels)
    logits = out.logits[:, :-1].reshape(-1, 97)
    tgt = labels[:, 1:].reshape(-1)
    keep = tgt != -100
    torch.testing.assert_close(out.loss, F.cross_entropy(logits[keep], tgt[keep]))
    assert int(out.aux["num_tokens"]) == int(keep.sum())
    assert model(ids, logits_to_keep=3).logits.shape == (2, 3, 97)


def test_loss_of_a_batch_without_scored_tokens_is_zero_not_nan():
    # e.g. a synthetic Stack batch with no POP: nothing to score; training must not see NaN
    model = _model()
    ids = torch.randint(0, 97, (2, 12))
    out = model(ids, labels=torch.full_like(ids, -100))
    assert out.loss.item() == 0.0 and int(out.aux["num_tokens"]) == 0
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() and not g.any() for g in grads)


def test_batched_left_and_right_padding_match_single_sequences():
    model = _model().double().eval()
    a = torch.randint(3, 97, (1, 6))
    b = torch.randint(3, 97, (1, 10))
    with torch.no_grad():
        la, lb = model(a).logits, model(b).logits
        pad = torch.zeros(1, 4, dtype=torch.long)
        mask = torch.ones(2, 10, dtype=torch.long)
        mask[0, :4] = 0
        left = model(torch.cat([torch.cat([pad, a], 1), b]), attention_mask=mask).logits
        right = model(torch.cat([torch.cat([a, pad], 1), b]), attention_mask=mask.flip(1)).logits
    torch.testing.assert_close(left[0, 4:], la[0], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(left[1], lb[0], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(right[0, :6], la[0], rtol=1e-9, atol=1e-9)


def test_gradient_checkpointing_same_grads_and_counts_load_once():
    ids = torch.randint(0, 97, (2, 9))
    grads, loads = [], []
    for ckpt in (False, True):
        model = _model().train()
        model.gradient_checkpointing_enable(ckpt)
        model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        loads.append(model.expert_loads())
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-7)
    assert torch.equal(loads[0], loads[1]) and loads[0].sum(1).eq(2 * 18).all()


def test_update_moe_bias_from_the_model():
    model = _model().train()
    ids = torch.randint(0, 97, (2, 9))
    model(ids)
    loads = model.expert_loads()
    model.update_moe_bias(0.5)
    bias = torch.stack([b.gate.e_score_correction_bias for b in model.moe_blocks()])
    torch.testing.assert_close(bias, 0.5 * torch.sign(loads.mean(1, keepdim=True) - loads))
    assert model.expert_loads().sum() == 0


def test_parameter_counts():
    model = _model()
    total = sum(p.numel() for p in model.parameters())
    assert model.num_parameters() == total
    emb = model.lm_head.weight.numel() * 2
    assert model.num_parameters(exclude_embeddings=True) == total - emb
    per_expert = 3 * 32 * 16
    assert model.num_parameters(active=True) == total - 3 * per_expert * (4 - 2)


def test_tiny_model_overfits_a_batch():
    """A KDA + MLA + MoE model memorises a random batch (the loss falls from ~ln(64) to near 0)."""
    torch.manual_seed(0)
    cfg = KimiLinearConfig.preset("tiny-moe", vocab_size=64, num_hidden_layers=2, hidden_size=64,
                                  linear_attn_config={"kda_layers": [1], "full_attn_layers": [2],
                                                      "head_dim": 32, "num_heads": 2, "short_conv_kernel_size": 4})
    model = KimiLinearForCausalLM(cfg, backend="reference").train()
    ids = torch.randint(0, 64, (2, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    first = None
    for _ in range(40):
        loss = model(ids, labels=ids).loss
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.update_moe_bias(1e-3)
    assert first > 3.5 and loss.item() < 0.3, (first, loss.item())


def test_bad_inputs():
    model = _model()
    with pytest.raises(ValueError, match="exactly one"):
        model()
    with pytest.raises(ValueError, match="labels must be"):
        model(torch.randint(0, 97, (2, 5)), labels=torch.zeros(2, 4, dtype=torch.long))


@pytest.mark.gpu
def test_bf16_forward_backward_on_cuda_backend_auto(cuda_device):
    torch.manual_seed(0)
    model = KimiLinearForCausalLM(KimiLinearConfig.preset("20m-moe"), backend="auto").to(cuda_device, torch.bfloat16)
    ids = torch.randint(0, 32000, (2, 300), device=cuda_device)
    mask = torch.ones_like(ids)
    mask[1, :50] = 0
    out = model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    out.loss.backward()
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.loss)
    assert 9.0 < out.loss.item() < 12.0  # ~ln(32000) at init
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    assert model.model.layers[0].self_attn.A_log.dtype == torch.float32


def test_packed_sequences_with_cu_seqlens_equal_separate_forwards():
    """Training on packed documents: no token attends (KDA state, short conv, MLA) across a boundary."""
    model = _model().double().eval()
    docs = [torch.randint(3, 97, (1, n)) for n in (7, 1, 12)]
    cu = torch.tensor([0, 7, 8, 20], dtype=torch.int32)
    with torch.no_grad():
        packed = model(torch.cat(docs, 1), cu_seqlens=cu).logits
        for i, d in enumerate(docs):
            torch.testing.assert_close(packed[:, cu[i]:cu[i + 1]], model(d).logits, rtol=1e-9, atol=1e-9)
