"""Two-way parity with transformers' KimiLinearForCausalLM (its pure-PyTorch path, eager attention).

A checkpoint transformers saves loads into our model and gives the same logits, and a checkpoint we
save loads into transformers and gives the same logits: fp32, T = 80 (> one 64-token chunk), batch
of 2, with and without left padding. Weights are scaled up from the init so that every layer
changes the logits (checked: perturbing one KDA gate parameter moves them far beyond the tolerance).
"""

from __future__ import annotations

import logging

import pytest
import torch

from kimi_linear.model import KimiLinearForCausalLM
from tests.layers.util import small_config
from tests.numerics import rel_rms, tolerance

transformers = pytest.importorskip("transformers")
TOL = tolerance("parity", torch.float32)


@pytest.fixture(scope="module")
def HFModel():
    """transformers' class, imported when the tests run (it imports Triton: after the test setup)."""
    cls = getattr(transformers, "KimiLinearForCausalLM", None)
    if cls is None:
        pytest.skip("this transformers has no KimiLinearForCausalLM")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    return cls


def _config(**over):
    return small_config(vocab_size=97, hidden_size=48, intermediate_size=64, moe_intermediate_size=24,
                        num_experts=6, num_experts_per_token=2, **over)


def _hf_model(HFModel, tmp_path):
    cfg = _config()
    cfg.save_pretrained(tmp_path / "cfg")
    hf_cfg = transformers.AutoConfig.from_pretrained(tmp_path / "cfg")
    hf_cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = HFModel(hf_cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "embed" not in name:
                p.normal_(0, 0.15)  # larger than init: every layer matters
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:
                b.normal_(0, 0.2)  # exercises biased choice vs unbiased weights
    return model


def _inputs():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 97, (2, 80), generator=g)
    mask = torch.ones(2, 80, dtype=torch.long)
    mask[0, :11] = 0
    return ids, mask


def _logits(model, ids, mask=None):
    with torch.no_grad():
        return model(ids, attention_mask=mask).logits


def test_transformers_checkpoint_loads_into_ours(tmp_path, HFModel):
    hf = _hf_model(HFModel, tmp_path)
    hf.save_pretrained(tmp_path / "hf")
    ours = KimiLinearForCausalLM.from_pretrained(tmp_path / "hf", backend="reference").eval()
    ids, mask = _inputs()
    ref = _logits(hf, ids)
    assert ref.std() > 0.5
    assert rel_rms(_logits(ours, ids), ref) <= TOL
    keep = mask.bool()
    assert rel_rms(_logits(ours, ids, mask)[keep], _logits(hf, ids, mask)[keep]) <= TOL
    # sensitivity: a small change to one KDA gate parameter is far outside the tolerance
    with torch.no_grad():
        ours.model.layers[3].self_attn.A_log.add_(0.3)
    assert rel_rms(_logits(ours, ids), ref) > 100 * TOL


def test_our_checkpoint_loads_into_transformers(tmp_path, HFModel):
    torch.manual_seed(0)
    ours = KimiLinearForCausalLM(_config(), backend="reference").eval()
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if p.dim() >= 2 and "embed" not in name:
                p.normal_(0, 0.15)
        for b in ours.moe_blocks():
            b.gate.e_score_correction_bias.normal_(0, 0.2)
    ours.save_pretrained(tmp_path / "ours")
    hf = HFModel.from_pretrained(tmp_path / "ours", attn_implementation="eager").eval()
    ids, mask = _inputs()
    ref = _logits(ours, ids)
    assert rel_rms(_logits(hf, ids), ref) <= TOL
    keep = mask.bool()
    assert rel_rms(_logits(hf, ids, mask)[keep], _logits(ours, ids, mask)[keep]) <= TOL
    # transformers saw every tensor: its state equals ours (after its own renames)
    assert torch.equal(hf.model.layers[0].self_attn.forget_gate.A_log, ours.model.layers[0].self_attn.A_log)
