"""Checkpoint format: the 48B tensor table, round trips, sharding, atomicity, strict errors, meta/dtype loads."""

from __future__ import annotations

import json
import os

import pytest
import safetensors.torch
import torch

from kimi_linear.model import KimiLinearConfig, KimiLinearForCausalLM
from kimi_linear.model import checkpoint as ckpt
from tests.layers.util import small_config


def test_48b_preset_maps_to_the_released_tensor_table():
    with torch.device("meta"):
        model = KimiLinearForCausalLM(KimiLinearConfig.preset("kimi_linear_48b_a3b"))
    model = model.to(torch.bfloat16)
    sd = model.state_dict()
    assert len(sd) == 20_493
    assert sum(t.numel() for t in sd.values()) == 49_122_681_728
    assert sd["model.layers.0.self_attn.A_log"].shape == (1, 1, 32, 1)
    assert sd["model.layers.0.self_attn.A_log"].dtype == torch.float32
    assert sd["model.layers.0.self_attn.dt_bias"].shape == (4096,)
    assert sd["model.layers.0.self_attn.q_conv1d.weight"].shape == (4096, 1, 4)
    assert sd["model.layers.0.mlp.gate_proj.weight"].shape == (9216, 2304)
    assert sd["model.layers.3.self_attn.kv_a_proj_with_mqa.weight"].shape == (576, 2304)
    assert sd["model.layers.3.self_attn.kv_b_proj.weight"].shape == (32 * 256, 512)
    assert sd["model.layers.5.block_sparse_moe.experts.255.w2.weight"].shape == (2304, 1024)
    assert sd["model.layers.5.block_sparse_moe.gate.e_score_correction_bias"].dtype == torch.float32
    assert sd["model.layers.26.block_sparse_moe.shared_experts.up_proj.weight"].shape == (1024, 2304)
    assert sd["lm_head.weight"].dtype == torch.bfloat16


def _model(**over):
    torch.manual_seed(0)
    return KimiLinearForCausalLM(small_config(**over), backend="reference")


def test_round_trip_bit_exact_with_fp32_gate_params(tmp_path):
    model = _model().bfloat16()
    with torch.no_grad():
        model.model.layers[1].block_sparse_moe.gate.e_score_correction_bias.normal_()
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    raw = safetensors.torch.load_file(tmp_path / "model.safetensors")
    assert raw["model.layers.0.self_attn.A_log"].dtype == torch.float32
    assert raw["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16
    loaded = KimiLinearForCausalLM.from_pretrained(tmp_path, backend="reference")
    assert json.load(open(tmp_path / "config.json"))["dtype"] == "bfloat16"
    for (n, a), (m, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert n == m and a.dtype == b.dtype and torch.equal(a, b), n
    # the non-persistent buffers (not in the file) are filled, not left as to_empty's garbage
    for (n, a), (m, b) in zip(model.named_buffers(), loaded.named_buffers()):
        assert n == m and torch.equal(a, b), n


def test_sharded_with_index(tmp_path):
    model = _model()
    model.save_pretrained(tmp_path, max_shard_size=20_000)
    index = json.load(open(tmp_path / ckpt.INDEX_FILE))
    shards = sorted(f for f in os.listdir(tmp_path) if f.endswith(".safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    sd = model.state_dict()
    assert set(index["weight_map"]) == set(sd)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in sd.values())
    loaded = KimiLinearForCausalLM.from_pretrained(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(sd.values(), loaded.state_dict().values()))


def test_crash_mid_write_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    target = tmp_path / "ckpt"
    old = _model()
    old.save_pretrained(target, max_shard_size=20_000)
    (target / "tokenizer.json").write_text("{}")
    before = {f: (target / f).read_bytes() for f in os.listdir(target)}
    calls = []

    def failing_save(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        return real(tensors, path, metadata=metadata)

    real = ckpt.save_file
    monkeypatch.setattr(ckpt, "save_file", failing_save)
    new = _model(vocab_size=101)
    with pytest.raises(OSError, match="simulated"):
        new.save_pretrained(target, max_shard_size=20_000)
    assert {f: (target / f).read_bytes() for f in os.listdir(target)} == before
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no temporary directory left behind
    monkeypatch.setattr(ckpt, "save_file", real)
    new.save_pretrained(target)  # a successful overwrite replaces the shards, keeps the tokenizer
    assert sorted(os.listdir(target)) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert KimiLinearForCausalLM.from_pretrained(target).config.vocab_size == 101


def test_strict_errors_list_every_problem_and_load_nothing(tmp_path):
    model = _model()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd.pop("model.layers.0.self_attn.A_log")
    sd["model.layers.0.self_attn.surprise"] = torch.zeros(3)
    sd["model.norm.weight"] = torch.zeros(7)
    model.config.save_pretrained(tmp_path)
    safetensors.torch.save_file(sd, tmp_path / "model.safetensors")
    target = _model()
    target_before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ckpt.CheckpointError) as exc:
        ckpt.load_state(target, tmp_path)
    msg = str(exc.value)
    assert "1 missing: ['model.layers.0.self_attn.A_log']" in msg
    assert "1 unexpected: ['model.layers.0.self_attn.surprise']" in msg
    assert "model.norm.weight: checkpoint (7,) vs model (32,)" in msg
    assert all(torch.equal(v, target_before[k]) for k, v in target.state_dict().items())
    with pytest.raises(ckpt.CheckpointError):
        KimiLinearForCausalLM.from_pretrained(tmp_path)


def test_meta_and_dtype_loading(tmp_path):
    model = _model()
    model.save_pretrained(tmp_path)
    meta = KimiLinearForCausalLM.from_pretrained(tmp_path, device="meta", dtype=torch.bfloat16)
    assert meta.lm_head.weight.is_meta and meta.lm_head.weight.dtype == torch.bfloat16
    assert meta.model.layers[0].self_attn.A_log.dtype == torch.float32
    bf = KimiLinearForCausalLM.from_pretrained(tmp_path, dtype="bfloat16")
    assert torch.equal(bf.lm_head.weight, model.lm_head.weight.bfloat16())
    assert torch.equal(bf.model.layers[0].self_attn.dt_bias, model.model.layers[0].self_attn.dt_bias)
    assert torch.isfinite(bf(torch.randint(0, 97, (1, 5))).logits).all()


def test_parse_size():
    assert ckpt.parse_size("5GB") == 5 * 10**9 and ckpt.parse_size("2MiB") == 2 * 2**20 and ckpt.parse_size(7) == 7
    with pytest.raises(ValueError):
        ckpt.parse_size("lots")
