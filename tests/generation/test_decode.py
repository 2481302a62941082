"""Cached prefill + decode reproduces the full forward (reference backend, fp32, CPU).

Presets: hybrid (3 KDA : 1 MLA), all-KDA, all-MLA, hybrid with MoE; batched prompts of different
lengths (left padding), prompts fed in pieces, and the cache contents themselves.
"""

from __future__ import annotations

import pytest
import torch

from kimi_linear.generation.cache import cache_for_config
from kimi_linear.generation.generate import forward_last_logits
from kimi_linear.model import KimiLinearConfig, KimiLinearForCausalLM
from tests.numerics import assert_close, rel_rms

PRESETS = ["tiny", "tiny-kda", "tiny-mla", "tiny-moe"]
V = 97


def make_model(preset: str, **overrides) -> KimiLinearForCausalLM:
    torch.manual_seed(0)
    cfg = KimiLinearConfig.preset(preset, vocab_size=V, **overrides)
    return KimiLinearForCausalLM(cfg, backend="reference").eval()


def prefill_then_decode(model, ids: torch.Tensor, prefill: int):
    """Last-position logits ``[B, T - prefill + 1, vocab]``: one prefill of ``prefill`` tokens, then one
    decode step per remaining token; and the cache."""
    cache = cache_for_config(model.config, batch_size=ids.shape[0], max_len=ids.shape[1])
    got = [forward_last_logits(model, ids[:, :prefill], cache)]
    for t in range(prefill, ids.shape[1]):
        got.append(forward_last_logits(model, ids[:, t:t + 1], cache))
    return torch.stack(got, 1), cache


@pytest.mark.parametrize("preset", PRESETS)
@torch.no_grad()
def test_prefill_then_decode_equals_full_forward(preset):
    model = make_model(preset)
    ids = torch.randint(0, V, (2, 14))
    full = model(ids).logits
    got, cache = prefill_then_decode(model, ids, 6)
    assert cache.lengths.tolist() == [14, 14]
    assert_close(got, full[:, 5:], "decode", torch.float32, f"{preset} decode")


@pytest.mark.parametrize("preset", ["tiny", "tiny-mla-moe"])
@torch.no_grad()
def test_batched_left_padded_prompts_and_pieces_match_each_sequence_alone(preset):
    model = make_model(preset)
    lens, extra = [7, 2, 5], 6
    seqs = [torch.randint(1, V, (n + extra,)) for n in lens]
    P = max(lens)
    ids = torch.full((3, P), 0, dtype=torch.long)
    mask = torch.zeros(3, P, dtype=torch.long)
    for b, n in enumerate(lens):
        ids[b, P - n:], mask[b, P - n:] = seqs[b][:n], 1
    cache = cache_for_config(model.config, batch_size=3, max_len=P + extra)
    outs = [forward_last_logits(model, ids, cache, mask)]
    # a 3-token piece (prefill continuing over the cache), then single-token decode
    outs.append(forward_last_logits(model, torch.stack([s[n:n + 3] for s, n in zip(seqs, lens)]), cache))
    for t in range(3, extra):
        outs.append(forward_last_logits(model, torch.stack([s[n + t:n + t + 1] for s, n in zip(seqs, lens)]), cache))
    assert cache.lengths.tolist() == [n + extra for n in lens]
    for b, n in enumerate(lens):
        full = model(seqs[b][None]).logits[0]
        ref = torch.stack([full[n - 1], full[n + 2]] + [full[n + t] for t in range(3, extra)])
        assert_close(torch.stack([o[b] for o in outs]), ref, "decode", torch.float32, f"{preset} row {b}")


@pytest.mark.parametrize("preset", ["tiny", "tiny-kda", "tiny-mla"])
@torch.no_grad()
def test_prompt_in_pieces_equals_one_prefill(preset):
    model = make_model(preset)
    ids = torch.randint(0, V, (2, 13))
    one = cache_for_config(model.config, batch_size=2, max_len=16)
    a = forward_last_logits(model, ids, one)
    pieces = cache_for_config(model.config, batch_size=2, max_len=16)
    for s, e in ((0, 5), (5, 6), (6, 13)):
        b = forward_last_logits(model, ids[:, s:e], pieces)
    assert_close(b, a, "decode", torch.float32, "last logits")
    for x, y in zip(pieces.tensors(), one.tensors()):
        if x.is_floating_point():
            assert_close(x, y, "decode", torch.float32, "cache buffers")
        else:
            assert torch.equal(x, y)
    # the MLA cache holds only the latent + shared key part, nothing decompressed
    for kind, layer in zip(one.layer_kinds, one.layers):
        if kind == "mla":
            assert layer.latent.shape[-1] == model.config.kv_lora_rank
            assert layer.k_rope.shape[-1] == model.config.qk_rope_head_dim


@torch.no_grad()
def test_model_forward_with_cache_opens_its_own_step():
    model = make_model("tiny")
    ids = torch.randint(0, V, (1, 9))
    full = model(ids).logits
    cache = cache_for_config(model.config, batch_size=1, max_len=9)
    res = model(ids[:, :8], cache=cache)
    assert res.cache is cache
    out = res.logits
    nxt = model(ids[:, 8:], cache=cache).logits
    assert_close(out, full[:, :8], "decode", torch.float32, "prefill logits")
    assert_close(nxt[:, 0], full[:, 8], "decode", torch.float32, "decode logits")
    assert cache.step is None and cache.lengths.tolist() == [9]


@torch.no_grad()
def test_reorder_cache_between_steps_is_exact():
    model = make_model("tiny")
    ids = torch.randint(0, V, (3, 6))
    cache = cache_for_config(model.config, batch_size=3, max_len=8)
    forward_last_logits(model, ids, cache)
    perm = torch.tensor([2, 0, 1])
    c2 = cache.select(perm)
    nxt = torch.randint(0, V, (3, 1))
    a = forward_last_logits(model, nxt, cache)
    b = forward_last_logits(model, nxt[perm], c2)
    assert torch.equal(a[perm], b)


@pytest.mark.parametrize("preset", ["tiny-kda", "tiny-moe"])
@torch.no_grad()
def test_triton_backend_decode_equals_reference_full_forward(preset):
    # the Triton decode path (in-place conv-window step, recurrent kernel, chunked prefill, inference
    # norms; with MoE: one-launch routing, routed + shared experts in the same launches, latent MLA)
    # under the CPU interpreter against the reference backend's full forward
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and not __import__("kimi_linear.backends").backends.triton_interpret():
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    ref = make_model(preset)
    model = KimiLinearForCausalLM(ref.config, backend="triton").eval()
    model.load_state_dict(ref.state_dict())
    ids = torch.randint(0, V, (2, 9))
    got, _ = prefill_then_decode(model, ids, 5)
    assert_close(got, ref(ids).logits[:, 4:], "decode", torch.float32, f"{preset} triton decode")


def _coarse_decode_tiles(monkeypatch):
    """Few programs per launch: the interpreter runs them one by one (the tiles do not change the math)."""
    import kimi_linear.ops.gemv as gemv
    import kimi_linear.ops.moe_decode as md

    for kind in ("wide", "wide_few", "narrow"):
        monkeypatch.setitem(gemv.TILES, kind, dict(BLOCK_R=64, BLOCK_D=128, num_warps=4))
    monkeypatch.setitem(md.TILES, "gate_up_one", dict(BLOCK_R=64, BLOCK_D=128, num_warps=4))
    monkeypatch.setitem(md.TILES, "down_one", dict(BLOCK_R=64, BLOCK_I=128, num_warps=4))


@pytest.mark.parametrize("preset", ["tiny-moe", "tiny-gdn"])
@torch.no_grad()
def test_folded_decode_norms_match_the_unfolded_step(preset, monkeypatch):
    # batch 1 on Triton (interpreter): every decode step with the blocks' norms and residual adds folded
    # into the projections, router and expert kernels (FOLD_DECODE_NORMS) == the step with add_rms_norm
    # launches, and both == the reference full forward. tiny-moe: KDA and MLA layers, a dense first layer
    # and MoE layers with a shared expert of the routed size; tiny-gdn: attention layers whose decode
    # step does not take the fused input launch (the norm applied apart). Every call is a decode step.
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and not __import__("kimi_linear.backends").backends.triton_interpret():
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    import kimi_linear.model.modeling as modeling

    _coarse_decode_tiles(monkeypatch)
    ref = make_model(preset)
    model = KimiLinearForCausalLM(ref.config, backend="triton").eval()
    model.load_state_dict(ref.state_dict())
    ids = torch.randint(0, V, (1, 3))
    calls = []
    real = modeling.add_rms_norm
    monkeypatch.setattr(modeling, "add_rms_norm", lambda *a, **kw: calls.append(1) or real(*a, **kw))

    def decode_all():
        cache = cache_for_config(model.config, batch_size=1, max_len=ids.shape[1])
        return torch.stack([forward_last_logits(model, ids[:, t:t + 1], cache) for t in range(ids.shape[1])], 1)

    monkeypatch.setattr(modeling, "FOLD_DECODE_NORMS", True)
    folded = decode_all()
    assert not calls  # no add + norm launch left: the final norm is a plain one
    monkeypatch.setattr(modeling, "FOLD_DECODE_NORMS", False)
    unfolded = decode_all()
    assert len(calls) == ids.shape[1] * 2 * model.config.num_hidden_layers
    assert rel_rms(folded, unfolded) < 1e-6
    assert_close(folded, ref(ids).logits, "decode", torch.float32, f"{preset} folded decode")


@torch.no_grad()
def test_folded_decode_next_to_blocks_that_do_not_fold(monkeypatch):
    # MoE blocks whose shared expert is twice a routed expert's width (a separate MLP) keep the unfolded
    # step; the dense first block folds, and so does block 2 once its shared expert is dropped (in both
    # models): it is fed block 1's pending output and adds it first
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and not __import__("kimi_linear.backends").backends.triton_interpret():
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    _coarse_decode_tiles(monkeypatch)
    ref = make_model("tiny-moe", num_shared_experts=2)
    ref.model.layers[2].block_sparse_moe.shared_experts = None
    model = KimiLinearForCausalLM(ref.config, backend="triton").eval()
    model.model.layers[2].block_sparse_moe.shared_experts = None
    model.load_state_dict(ref.state_dict())
    seen = []
    for layer in model.model.layers:
        real = layer._folds_norms
        layer._folds_norms = lambda h, c, real=real: seen.append(real(h, c)) or seen[-1]
    ids = torch.randint(0, V, (1, 2))
    cache = cache_for_config(model.config, batch_size=1, max_len=2)
    got = torch.stack([forward_last_logits(model, ids[:, t:t + 1], cache) for t in range(2)], 1)
    assert seen == [True, False, True, False] * 2
    assert_close(got, ref(ids).logits, "decode", torch.float32, "folded and unfolded blocks")
