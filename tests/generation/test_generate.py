"""generate(): greedy == argmax of the full forward, batching with padding, sampling, stopping, streaming,
bad input (clear errors, cache left usable), and parity with transformers' own generate."""

from __future__ import annotations

import pytest
import torch

from kimi_linear.generation.cache import cache_for_config
from kimi_linear.generation.generate import generate, stream_generate
from kimi_linear.model import KimiLinearConfig, KimiLinearForCausalLM

V = 97


@pytest.fixture(scope="module")
def model() -> KimiLinearForCausalLM:
    torch.manual_seed(0)
    cfg = KimiLinearConfig.preset("tiny-moe", vocab_size=V, eos_token_id=2, pad_token_id=0)
    return KimiLinearForCausalLM(cfg, backend="reference").eval()


@torch.no_grad()
def greedy_by_full_forward(model, prompt: torch.Tensor, n: int) -> list[int]:
    ids = prompt[None]
    out = []
    for _ in range(n):
        tok = int(model(ids).logits[0, -1].argmax())
        out.append(tok)
        ids = torch.cat([ids, torch.tensor([[tok]])], dim=1)
    return out


def left_pad(prompts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), T, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, T - len(p):], mask[b, T - len(p):] = p, 1
    return ids, mask


def test_greedy_equals_full_forward_argmax_for_padded_batch(model):
    prompts = [torch.randint(3, V, (n,)) for n in (6, 1, 4)]
    ids, mask = left_pad(prompts)
    out = model.generate(ids, mask, max_new_tokens=7)
    for b, p in enumerate(prompts):
        assert out.new_tokens[b] == greedy_by_full_forward(model, p, 7)
    assert out.sequences.shape == (3, 6 + 7) and torch.equal(out.sequences[:, :6], ids)
    assert out.finish_reason == ["length"] * 3


def test_seeded_sampling_is_reproducible(model):
    ids = torch.randint(3, V, (2, 5))
    kw = dict(max_new_tokens=10, do_sample=True, temperature=1.3, top_k=20, top_p=0.95)
    a = generate(model, ids, seed=7, **kw).new_tokens
    b = generate(model, ids, seed=7, **kw).new_tokens
    c = generate(model, ids, seed=8, **kw).new_tokens
    assert a == b and a != c


def test_repetition_penalty_changes_greedy_output(model):
    ids = torch.randint(3, V, (1, 5))
    plain = generate(model, ids, max_new_tokens=12).new_tokens[0]
    penalised = generate(model, ids, max_new_tokens=12, repetition_penalty=50.0).new_tokens[0]
    assert len(set(penalised)) == len(penalised)  # a strong penalty forbids repeats among 97 tokens
    assert len(set(penalised) & set(ids[0].tolist())) == 0
    assert plain != penalised or len(set(plain)) == len(plain)


@torch.no_grad()
def greedy_with_penalty_by_full_forward(model, prompt, n, penalty, penalise_prompt=True, penalise_output=True) -> list[int]:
    """Greedy decoding by full forwards with the CTRL penalty applied by hand to every seen token."""
    ids, out = prompt[None], []
    seen = set(prompt.tolist()) if penalise_prompt else set()
    for _ in range(n):
        x = model(ids).logits[0, -1].double().clone()
        for t in seen:
            x[t] = x[t] / penalty if x[t] > 0 else x[t] * penalty
        tok = int(x.argmax())
        out.append(tok)
        if penalise_output:
            seen.add(tok)
        ids = torch.cat([ids, torch.tensor([[tok]])], dim=1)
    return out


def test_repetition_penalty_equals_full_forward_by_hand(model):
    # pick a prompt where leaving out either the prompt's tokens or the generated ones changes the
    # output, so that generate() must mark both as seen to pass
    gen = torch.Generator().manual_seed(0)
    n, pen = 10, 1.8
    for _ in range(40):
        prompt = torch.randint(3, V, (5,), generator=gen)
        want = greedy_with_penalty_by_full_forward(model, prompt, n, pen)
        if (want != greedy_with_penalty_by_full_forward(model, prompt, n, pen, penalise_prompt=False)
                and want != greedy_with_penalty_by_full_forward(model, prompt, n, pen, penalise_output=False)):
            break
    else:
        pytest.fail("no prompt found where both the prompt's and the generated tokens matter to the penalty")
    assert want != greedy_by_full_forward(model, prompt, n)  # the penalty itself matters too
    assert generate(model, prompt[None], max_new_tokens=n, repetition_penalty=pen).new_tokens[0] == want


def test_eos_and_stop_sequences(model):
    ids = torch.randint(3, V, (2, 4))
    free = generate(model, ids, max_new_tokens=8).new_tokens
    # stop when row 0's third token appears: row 0 ends there (token kept), row 1 goes on unless it hits it too
    eos = free[0][2]
    out = generate(model, ids, max_new_tokens=8, eos_token_id=[eos])
    assert out.new_tokens[0] == free[0][:3] and out.finish_reason[0] == "eos"
    if eos not in free[1]:
        assert out.new_tokens[1] == free[1] and out.finish_reason[1] == "length"
    assert (out.sequences[0, 4 + 3:] == 0).all()  # padded after the stop
    stop = free[1][1:3]
    out = generate(model, ids, max_new_tokens=8, stop_sequences=[stop])
    assert out.new_tokens[1] == free[1][:3] and out.finish_reason[1] == "stop_sequence"


def test_streaming_iterator_matches_generate(model):
    ids = torch.randint(3, V, (2, 3))
    events = list(stream_generate(model, ids, max_new_tokens=6))
    assert [e.step for e in events] == list(range(6))
    streamed = torch.stack([e.tokens for e in events], 1).tolist()
    seen = []
    out = generate(model, ids, max_new_tokens=6, streamer=lambda e: seen.append(e.tokens.tolist()))
    assert streamed == out.new_tokens and [list(r) for r in zip(*seen)] == out.new_tokens


def test_bad_input_raises_and_cache_stays_usable(model):
    cache = cache_for_config(model.config, batch_size=2, max_len=8)
    ids = torch.randint(3, V, (2, 4))
    with pytest.raises(ValueError, match="do not fit the cache"):
        generate(model, torch.randint(3, V, (2, 7)), max_new_tokens=4, cache=cache)
    with pytest.raises(ValueError, match="empty prompt"):
        generate(model, torch.zeros(2, 0, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="empty prompt"):
        generate(model, ids, torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0]]), cache=cache)
    with pytest.raises(ValueError, match="vocab_size=97"):
        generate(model, torch.tensor([[5, 97, 3, 4], [1, 2, 3, 4]]), cache=cache)
    with pytest.raises(ValueError, match="vocab_size=97"):
        generate(model, torch.tensor([[5, -1, 3, 4], [1, 2, 3, 4]]), cache=cache)
    with pytest.raises(ValueError, match="cache holds 2"):
        generate(model, torch.randint(3, V, (3, 4)), cache=cache)
    with pytest.raises(TypeError, match="integer"):
        generate(model, torch.rand(2, 4), cache=cache)
    # a model call with a bad id fails inside the forward: the step is aborted, nothing advanced
    with pytest.raises(IndexError):
        model(torch.tensor([[1, 500], [1, 2]]), cache=cache)
    assert cache.step is None and cache.lengths.tolist() == [0, 0]
    out = generate(model, ids, max_new_tokens=4, cache=cache)
    assert out.new_tokens == generate(model, ids, max_new_tokens=4).new_tokens


def test_generation_matches_transformers_generate():
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "KimiLinearForCausalLM"):
        pytest.skip("transformers has no kimi_linear model")
    import tempfile

    torch.manual_seed(0)
    cfg = transformers.KimiLinearConfig(
        vocab_size=V, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=4,
        num_attention_heads=2, num_key_value_heads=2, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=16, num_local_experts=4, num_experts_per_tok=2, n_shared_experts=1,
        linear_attn_config={"full_attn_layers": [4], "kda_layers": [1, 2, 3], "head_dim": 16, "num_heads": 2,
                            "short_conv_kernel_size": 4},
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    hf = transformers.KimiLinearForCausalLM(cfg).eval()
    with torch.no_grad():  # larger than the init, so that every layer moves the argmax (at init they barely do)
        for name, p in hf.named_parameters():
            if p.dim() >= 2 and "embed" not in name:
                p.normal_(0, 0.15)
        for name, b in hf.named_buffers():
            if "e_score_correction_bias" in name:
                b.normal_(0, 0.2)
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = KimiLinearForCausalLM.from_pretrained(d, backend="reference", dtype=torch.float32).eval()
    ids = torch.randint(3, V, (2, 9))
    with torch.no_grad():
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    out = ours.generate(ids, max_new_tokens=12)
    assert out.new_tokens == ref[:, 9:].tolist()
