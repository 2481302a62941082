"""The trainer with the real KimiLinearForCausalLM (tiny 3:1-style hybrid with MoE) on CPU."""

from __future__ import annotations

import pytest
import torch

from kimi_linear.train.config import TrainConfig
from kimi_linear.train.trainer import Trainer, train

TINY = dict(hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
            num_attention_heads=2, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
            linear_attn_config={"full_attn_layers": [2], "kda_layers": [1], "head_dim": 8, "num_heads": 2,
                                "short_conv_kernel_size": 4},
            num_experts=4, num_experts_per_token=2, num_shared_experts=1)


def _cfg(tmp_path, name="run", **kw):
    d = tmp_path / "corpus"
    d.mkdir(exist_ok=True)
    for i in range(5):
        (d / f"m{i}.py").write_text(f"def f{i}(x):\n    return x * {i} + {i * i}\n" * 20)
    base = dict(model="tiny-moe", model_overrides=dict(TINY), data=[str(d)], out_dir=str(tmp_path / name), steps=8,
                seq_len=32, batch_size=4, micro_batch_size=2, lr=3e-3, warmup_steps=2, eval_every=4, eval_rows=4,
                save_every=4, log_every=1, progress=False, val_fraction=0.2, shuffle_buffer=8, threads=1,
                moe_bias_update_rate=1e-2)
    base.update(kw)
    return TrainConfig(**base)


class _Kill(Exception):
    pass


@pytest.mark.parametrize("varlen", [False, True])
def test_real_model_resume_is_exact(tmp_path, varlen):
    full = train(_cfg(tmp_path, "a", varlen=varlen), log=lambda *_: None)

    def kill(step, loss):
        if step == 6:
            raise _Kill

    with pytest.raises(_Kill):
        train(_cfg(tmp_path, "b", varlen=varlen), on_step_end=kill, log=lambda *_: None)
    resumed = train(_cfg(tmp_path, "b", varlen=varlen, resume=True), log=lambda *_: None)
    assert sorted(resumed.losses) == [5, 6, 7, 8]
    assert [resumed.losses[s] for s in range(5, 9)] == [full.losses[s] for s in range(5, 9)]
    assert resumed.val_losses[8] == full.val_losses[8]


def test_real_model_learns_fixed_batch_and_balances_moe(tmp_path):
    tr = Trainer(_cfg(tmp_path, steps=100, warmup_steps=0, weight_decay=0.0), log=lambda *_: None)
    tr._t0 = 0.0
    rows = [tr.stream.next_row() for _ in range(4)]
    bias_before = [b.gate.e_score_correction_bias.clone() for b in tr.raw_model.moe_blocks()]
    losses = [tr._train_step(rows)[0] for _ in range(12)]
    assert losses[-1] < losses[0] - 1.0, losses
    assert tr.moe_stats is not None and tr.moe_stats["routers"] == 1
    moved = [not torch.equal(a, b.gate.e_score_correction_bias) for a, b in zip(bias_before, tr.raw_model.moe_blocks())]
    assert all(moved)  # the balancing update ran every step
    assert all(float(b.expert_load.sum()) == 0 for b in tr.raw_model.moe_blocks())  # counts consumed


def test_gradient_checkpointing_same_first_step(tmp_path):
    a = train(_cfg(tmp_path, "a", steps=2, eval_every=0, save_every=0), log=lambda *_: None)
    b = train(_cfg(tmp_path, "b", steps=2, eval_every=0, save_every=0, grad_checkpointing=True), log=lambda *_: None)
    assert abs(a.losses[1] - b.losses[1]) < 1e-6 and abs(a.losses[2] - b.losses[2]) < 1e-4


def test_varlen_changes_what_the_model_sees(tmp_path):
    a = train(_cfg(tmp_path, "a", steps=1, eval_every=0, save_every=0), log=lambda *_: None)
    b = train(_cfg(tmp_path, "b", steps=1, eval_every=0, save_every=0, varlen=True), log=lambda *_: None)
    assert a.losses[1] != b.losses[1]


def test_no_weight_decay_on_gates_and_norms(tmp_path):
    from kimi_linear.train.optim import param_groups

    tr = Trainer(_cfg(tmp_path), log=lambda *_: None)
    groups = param_groups(tr.raw_model, 0.1)
    decayed = {n for g in groups if g["weight_decay"] > 0 for n in g["names"]}
    kept = {n for g in groups if g["weight_decay"] == 0 for n in g["names"]}
    assert any(n.endswith("A_log") for n in kept) and any(n.endswith("dt_bias") for n in kept)
    assert any("layernorm" in n for n in kept) and not any("norm" in n.lower() for n in decayed)
    assert any(n.endswith("q_proj.weight") for n in decayed) and "lm_head.weight" in decayed
