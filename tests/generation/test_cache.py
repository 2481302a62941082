"""HybridCache: allocation, step planning, bit-exact reset/select/reorder/copy, accounting, bad input."""

from __future__ import annotations

import pytest
import torch

from kimi_linear.generation.cache import HybridCache, KDACacheSpec, MLACacheSpec, cache_bytes

KINDS = ("kda", "kda", "mla", "kda", "mla")
KSPEC = KDACacheSpec(num_heads=2, head_k=4, head_v=6, conv_dims=(8, 8, 12), conv_kernel=4)
MSPEC = MLACacheSpec(kv_lora_rank=16, qk_rope_head_dim=4)


def make(batch=3, max_len=10, dtype=torch.float32) -> HybridCache:
    return HybridCache.allocate(KINDS, batch_size=batch, max_len=max_len, kda=KSPEC, mla=MSPEC, dtype=dtype)


def fill_random(cache: HybridCache) -> None:
    for t in cache.tensors()[:-1]:
        t.copy_(torch.randn(t.shape, dtype=t.dtype))
    cache.lengths.copy_(torch.randint(0, cache.max_len, cache.lengths.shape))


def test_shapes_and_dtypes():
    c = make(dtype=torch.bfloat16)
    kda, mla = c.layers[0], c.layers[2]
    assert kda.conv_q.shape == (3, 8, 3) and kda.conv_v.shape == (3, 12, 3) and kda.conv_q.dtype == torch.bfloat16
    assert kda.state.shape == (3, 2, 4, 6) and kda.state.dtype == torch.float32
    assert mla.latent.shape == (3, 10, 16) and mla.k_rope.shape == (3, 10, 4) and mla.latent.dtype == torch.bfloat16


def test_memory_accounting_matches_buffers_and_formula():
    c = make(dtype=torch.bfloat16)
    m = c.memory()
    kda_bytes = sum(t.numel() * t.element_size() for layer in c.layers if hasattr(layer, "state") for t in layer.tensors())
    assert m["kda"]["bytes"] == kda_bytes and m["kda"]["layers"] == 3
    assert m["mla"]["bytes_per_token"] == (16 + 4) * 2
    assert m["bytes_per_token"] == 2 * (16 + 4) * 2
    assert m["mla"]["bytes_allocated"] == 2 * 3 * 10 * 20 * 2
    assert m["total_allocated"] == kda_bytes + m["mla"]["bytes_allocated"]
    c.lengths.copy_(torch.tensor([1, 2, 3]))
    assert c.memory()["mla"]["bytes_used"] == 6 * m["bytes_per_token"]
    planned = cache_bytes(KINDS, batch_size=3, context=10, kda=KSPEC, mla=MSPEC, dtype=torch.bfloat16)
    assert planned["total"] == m["total_allocated"]
    # per sequence: conv windows (bf16) + fp32 state for each KDA layer
    assert planned["bytes_per_sequence_fixed"] == 3 * ((8 + 8 + 12) * 3 * 2 + 2 * 4 * 6 * 4)


def test_paper_cache_ratio_7_of_27():
    kinds = ["mla" if (i + 1) % 4 == 0 or i == 26 else "kda" for i in range(27)]
    mspec = MLACacheSpec(512, 64)
    hybrid = cache_bytes(kinds, batch_size=1, context=1, kda=KSPEC, mla=mspec, dtype=torch.bfloat16)
    full = cache_bytes(["mla"] * 27, batch_size=1, context=1, kda=None, mla=mspec, dtype=torch.bfloat16)
    assert hybrid["mla_layers"] == 7
    assert hybrid["bytes_per_token"] == 8064 and full["bytes_per_token"] == 31104


def test_reset_zeroes_in_place():
    c = make()
    fill_random(c)
    ptrs = [t.data_ptr() for t in c.tensors()]
    c.reset()
    assert all(int(t.count_nonzero()) == 0 for t in c.tensors())
    assert ptrs == [t.data_ptr() for t in c.tensors()]


def test_select_reorder_clone_copy_bit_exact():
    c = make()
    fill_random(c)
    idx = torch.tensor([2, 0, 0, 1])
    s = c.select(idx)
    assert s.batch_size == 4
    for a, b in zip(s.tensors(), c.tensors()):
        assert torch.equal(a, b[idx])
    before = [t.clone() for t in c.tensors()]
    perm = torch.tensor([1, 2, 0])
    c.reorder_(perm)
    for a, b in zip(c.tensors(), before):
        assert torch.equal(a, b[perm])
    k = c.clone()
    for a, b in zip(k.tensors(), c.tensors()):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()
    other = make()
    other.copy_(k)
    for a, b in zip(other.tensors(), k.tensors()):
        assert torch.equal(a, b)
    k.layers[0].state.add_(1.0)  # independent storage
    assert not torch.equal(k.layers[0].state, c.layers[0].state)


def test_bad_index_and_batch_mismatch():
    c = make()
    with pytest.raises(ValueError, match="cache holds 3"):
        c.reorder_(torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        c.select(torch.tensor([3]))
    with pytest.raises(ValueError, match="cache holds 3"):
        c.begin_step(2, torch.ones(2, 2))
    with pytest.raises(ValueError, match="batch size 2"):
        make().copy_(make(batch=2))
    assert c.step is None  # nothing left open


def test_step_positions_with_left_padding_and_commit():
    c = make(max_len=6)
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1], [0, 1, 1, 1]])
    step = c.begin_step(4, mask)
    assert step.num_new.tolist() == [2, 4, 3] and step.key_len == 4 and not step.decode
    assert step.positions.tolist() == [[0, 0, 0, 1], [0, 1, 2, 3], [0, 0, 1, 2]]
    latent = torch.randn(3, 4, 16)
    rope = torch.randn(3, 4, 4)
    layer = c.layers[2]
    layer.write(latent, rope, step)
    assert torch.equal(layer.latent[0, :2], latent[0, 2:]) and torch.equal(layer.latent[2, :3], latent[2, 1:])
    km = step.key_mask
    assert km[0, 3].tolist() == [True, True, False, False] and km[0, 0].tolist() == [True, False, False, False]
    c.commit_step()
    assert c.lengths.tolist() == [2, 4, 3]
    step = c.begin_step(1)  # decode: one token per row at lengths[b]
    assert step.decode and step.positions[:, 0].tolist() == [2, 4, 3] and step.key_len == 5
    new = torch.randn(3, 1, 16)
    layer.write(new, torch.randn(3, 1, 4), step)
    assert torch.equal(layer.latent[1, 4], new[1, 0]) and torch.equal(layer.latent[0, 2], new[0, 0])
    c.commit_step()
    assert c.lengths.tolist() == [3, 5, 4]


def test_step_errors_leave_cache_usable():
    c = make(max_len=5)
    c.begin_step(3)
    c.commit_step()
    snapshot = [t.clone() for t in c.tensors()]
    with pytest.raises(ValueError, match="max_len=5"):
        c.begin_step(3)
    with pytest.raises(ValueError, match="first chunk"):
        c.begin_step(2, torch.tensor([[0, 1], [1, 1], [1, 1]]))
    with pytest.raises(ValueError, match="left only"):
        c.begin_step(2, torch.tensor([[1, 0], [1, 1], [1, 1]]))
    with pytest.raises(ValueError, match="at least one token"):
        c.begin_step(0)
    for a, b in zip(c.tensors(), snapshot):
        assert torch.equal(a, b)
    assert c.step is None
    c.begin_step(2)  # still usable
    c.commit_step()
    assert c.lengths.tolist() == [5, 5, 5]
    with pytest.raises(ValueError, match="full"):
        c.begin_step(1)
    e = make()
    with pytest.raises(ValueError, match="at least one token"):
        e.begin_step(2, torch.tensor([[0, 0], [1, 1], [1, 1]]))


def test_bad_specs():
    with pytest.raises(ValueError, match="KDACacheSpec"):
        HybridCache.allocate(("kda",), batch_size=1, max_len=4)
    with pytest.raises(ValueError, match="layer kinds"):
        HybridCache.allocate(("gru",), batch_size=1, max_len=4)
    with pytest.raises(ValueError, match="conv_kernel"):
        KDACacheSpec(num_heads=1, head_k=1, head_v=1, conv_dims=(1, 1, 1), conv_kernel=0)
