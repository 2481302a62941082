"""On a GPU (backend auto = Triton chunk/recurrent KDA, latent MLA kernel, MoE decode kernel, CUDA graphs):
cached prefill + decode reproduces the full forward, and graph-replayed generation equals eager generation."""

from __future__ import annotations

import pytest
import torch

from kimi_linear.generation.cache import cache_for_config
from kimi_linear.generation.generate import forward_last_logits, generate
from kimi_linear.model import KimiLinearConfig, KimiLinearForCausalLM
from tests.numerics import assert_close

pytestmark = pytest.mark.gpu
V = 97


def make(preset: str, device, dtype=torch.float32) -> KimiLinearForCausalLM:
    torch.manual_seed(0)
    cfg = KimiLinearConfig.preset(preset, vocab_size=V)
    return KimiLinearForCausalLM(cfg, backend="auto").to(device=device, dtype=dtype).eval()


@pytest.mark.parametrize("preset", ["tiny", "tiny-kda", "tiny-mla", "tiny-moe"])
@torch.no_grad()
def test_decode_equals_forward_cuda(preset, cuda_device):
    check_decode_equals_forward(preset, cuda_device)


@pytest.mark.parametrize("preset", ["tiny", "tiny-mla"])
@torch.no_grad()
def test_decode_equals_forward_keys_major_latent_cuda(preset, cuda_device, monkeypatch):
    # the long-context latent kernel (keys-major, tiles through TMA) at every context
    from kimi_linear.ops import latent_attention_triton as lt

    monkeypatch.setitem(lt.TILES, "keys_major_from", 0)
    assert lt.TILES["keys_major_tma"]
    check_decode_equals_forward(preset, cuda_device)


def check_decode_equals_forward(preset, cuda_device):
    """Two prompts of different lengths (left-padded) prefilled into the cache, then 9 decode steps:
    each step's logits == the full forward's at that position (fp32)."""
    model = make(preset, cuda_device)
    lens, extra = [70, 33], 9
    seqs = [torch.randint(1, V, (n + extra,), device=cuda_device) for n in lens]
    P = max(lens)
    ids = torch.zeros(2, P, dtype=torch.long, device=cuda_device)
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lens):
        ids[b, P - n:], mask[b, P - n:] = seqs[b][:n], 1
    cache = cache_for_config(model.config, batch_size=2, max_len=P + extra, device=cuda_device)
    outs = [forward_last_logits(model, ids, cache, mask)]
    for t in range(extra):
        outs.append(forward_last_logits(model, torch.stack([s[n + t:n + t + 1] for s, n in zip(seqs, lens)]), cache))
    for b, n in enumerate(lens):
        full = model(seqs[b][None]).logits[0]
        ref = full[n - 1:n + extra]
        assert_close(torch.stack([o[b] for o in outs]), ref, "layer", torch.float32, f"{preset} row {b}")


@torch.no_grad()
def test_cuda_graph_generation_equals_eager(cuda_device):
    model = make("tiny-moe", cuda_device)
    ids = torch.randint(3, V, (3, 20), device=cuda_device)
    eager = generate(model, ids, max_new_tokens=24, cuda_graph=False)
    graphed = generate(model, ids, max_new_tokens=24, cuda_graph=True)
    assert graphed.cuda_graph and not eager.cuda_graph
    assert graphed.new_tokens == eager.new_tokens


@torch.no_grad()
def test_cuda_graph_generation_equals_eager_keys_major_latent(cuda_device, monkeypatch):
    # the keys-major latent kernel makes its TMA descriptors on the device, in scratch that Triton's
    # allocator hands out at launch: inside a captured graph as well as eagerly
    from kimi_linear.ops import latent_attention_triton as lt

    monkeypatch.setitem(lt.TILES, "keys_major_from", 0)
    model = make("tiny-mla-moe", cuda_device)
    ids = torch.randint(3, V, (2, 30), device=cuda_device)
    eager = generate(model, ids, max_new_tokens=20, cuda_graph=False)
    graphed = generate(model, ids, max_new_tokens=20, cuda_graph=True)
    assert graphed.cuda_graph and graphed.new_tokens == eager.new_tokens


@torch.no_grad()
def test_bf16_generation_runs_with_graphs(cuda_device):
    model = make("tiny", cuda_device, torch.bfloat16)
    ids = torch.randint(3, V, (2, 40), device=cuda_device)
    out = model.generate(ids, max_new_tokens=16, do_sample=True, top_p=0.9, seed=3)
    again = model.generate(ids, max_new_tokens=16, do_sample=True, top_p=0.9, seed=3)
    assert out.cuda_graph and out.new_tokens == again.new_tokens


@pytest.mark.parametrize("preset", ["tiny-moe", "tiny-mla-moe"])
@torch.no_grad()
def test_batch_one_folded_norms_decode_and_graphs(preset, cuda_device, monkeypatch):
    # batch 1: the decode step with the blocks' norms and residual adds folded into the projections, the
    # split router and the expert kernels (FOLD_DECODE_NORMS) == the unfolded step (fp32) and the full
    # forward; graph-replayed generation with it == eager. Every call is a decode step (one token from an
    # empty cache, and a one-token prompt): only the decode kernels run
    import kimi_linear.model.modeling as modeling

    model = make(preset, cuda_device)
    ids = torch.randint(3, V, (1, 24), device=cuda_device)
    outs = {}
    for fold in (True, False):
        monkeypatch.setattr(modeling, "FOLD_DECODE_NORMS", fold)
        cache = cache_for_config(model.config, batch_size=1, max_len=ids.shape[1], device=cuda_device)
        outs[fold] = torch.stack([forward_last_logits(model, ids[:, t:t + 1], cache) for t in range(ids.shape[1])], 1)
    assert_close(outs[True], outs[False], "layer", torch.float32, f"{preset} folded vs unfolded")
    assert_close(outs[True], model(ids).logits, "layer", torch.float32, f"{preset} folded vs forward")
    monkeypatch.setattr(modeling, "FOLD_DECODE_NORMS", True)
    eager = generate(model, ids[:, :1], max_new_tokens=16, cuda_graph=False)
    graphed = generate(model, ids[:, :1], max_new_tokens=16, cuda_graph=True)
    assert graphed.cuda_graph and graphed.new_tokens == eager.new_tokens


@pytest.mark.parametrize("preset", ["tiny-moe", "tiny-mla-moe"])
@torch.no_grad()
def test_pdl_decode_is_bit_identical(preset, cuda_device, monkeypatch):
    # programmatic dependent launch (ops/pdl.py) changes when a kernel's programs start, never what they
    # compute: batch-1 decode steps (every decode kernel: projections, router, experts, recurrent KDA,
    # latent attention, norms) give the same bits with it off and on, eager and graph-replayed, also with
    # the shared experts' programs running before their wait, beside the router (EARLY_SHARED_EXPERTS).
    # A kernel reading before its wait would see its predecessor's half-written output and differ
    from kimi_linear.ops import moe_decode, pdl

    if not pdl.use_pdl(cuda_device):
        pytest.skip("programmatic dependent launch needs compute capability >= 9")
    model = make(preset, cuda_device, torch.bfloat16)
    ids = torch.randint(3, V, (1, 24), device=cuda_device)
    steps, tokens = {}, {}
    for mode in ((False, False), (True, False), (True, True)):
        monkeypatch.setattr(pdl, "ENABLED", mode[0])
        monkeypatch.setattr(moe_decode, "EARLY_SHARED_EXPERTS", mode[1])
        cache = cache_for_config(model.config, batch_size=1, max_len=ids.shape[1], device=cuda_device,
                                 dtype=torch.bfloat16)
        steps[mode] = torch.stack([forward_last_logits(model, ids[:, t:t + 1], cache) for t in range(ids.shape[1])])
        out = generate(model, ids[:, :1], max_new_tokens=24, cuda_graph=True)
        assert out.cuda_graph
        tokens[mode] = out.new_tokens
    for mode in ((True, False), (True, True)):
        assert torch.equal(steps[mode], steps[False, False]), f"{preset}: decode logits differ, pdl / early = {mode}"
        assert tokens[mode] == tokens[False, False], f"{preset}: graph-replayed tokens differ, pdl / early = {mode}"


@pytest.mark.parametrize("preset", ["tiny", "tiny-mla-moe"])
@torch.no_grad()
def test_l2_prefetch_decode_is_bit_identical(preset, cuda_device, monkeypatch):
    # the output projections' L2 prefetch on a side stream (ops/prefetch.py) forks and joins inside each
    # decode step: same bits with it off and on, eager and graph-replayed (a capture with an unjoined fork
    # would fail; the forward joins after its last layer). The MLA layers fork theirs after the latent split
    # kernel (inside latent_attention_triton)
    from kimi_linear.layers import mla
    from kimi_linear.ops import prefetch

    monkeypatch.setattr(mla, "PREFETCH_OUTPUT_PROJECTION", True)  # the default; set so the test does not follow it
    model = make(preset, cuda_device, torch.bfloat16)
    if prefetch.prefetch_plan(model.lm_head.weight)[1] == 0:
        pytest.skip("the bulk L2 prefetch needs compute capability >= 9")
    ids = torch.randint(3, V, (1, 20), device=cuda_device)
    steps, tokens = {}, {}
    for on in (False, True):
        monkeypatch.setattr(prefetch, "ENABLED", on)
        cache = cache_for_config(model.config, batch_size=1, max_len=ids.shape[1], device=cuda_device,
                                 dtype=torch.bfloat16)
        steps[on] = torch.stack([forward_last_logits(model, ids[:, t:t + 1], cache) for t in range(ids.shape[1])])
        out = generate(model, ids[:, :1], max_new_tokens=20, cuda_graph=True)
        assert out.cuda_graph and not prefetch._pending
        tokens[on] = out.new_tokens
    assert torch.equal(steps[True], steps[False]), f"{preset}: decode logits differ with the L2 prefetch"
    assert tokens[True] == tokens[False], f"{preset}: graph-replayed tokens differ with the L2 prefetch"


@torch.no_grad()
def test_packed_experts_prefill_is_identical_and_copy_free(cuda_device, monkeypatch):
    # bf16 prefill through the grouped GEMMs (enough slots for that path): the packed experts give the
    # same logits bit for bit, and the grouped path takes their stacked view instead of a copy
    from kimi_linear.ops import moe

    model = make("tiny-moe", cuda_device, torch.bfloat16)
    ids = torch.randint(3, V, (2, 300), device=cuda_device)
    views = []
    real = moe.stacked_view
    monkeypatch.setattr(moe, "stacked_view", lambda parts: views.append(real(parts)) or views[-1])
    want = model(ids).logits
    assert views and all(v is None for v in views)  # the grouped path ran, on copies
    assert model.pack_experts_() > 0
    views.clear()
    got = model(ids).logits
    assert views and all(v is not None for v in views)
    assert torch.equal(got, want)
