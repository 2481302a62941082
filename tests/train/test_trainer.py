"""Trainer: loss falls on a fixed batch, exact resume after a kill, clear early failures."""

from __future__ import annotations

import itertools
import json
import types

import pytest
import torch
import torch.nn.functional as F

from kimi_linear.train.config import TrainConfig
from kimi_linear.train.trainer import Trainer, train
from tests.train.stand_in import stand_in_factory


def _corpus(tmp_path, n_files=6):
    d = tmp_path / "corpus"
    d.mkdir(exist_ok=True)
    for i in range(n_files):
        (d / f"doc{i}.txt").write_text(f"file {i}: " + " ".join(f"word{(i * 7 + j) % 23}" for j in range(400)))
    return str(d)


def _cfg(tmp_path, **kw):
    base = dict(data=[_corpus(tmp_path)], out_dir=str(tmp_path / "run"), steps=20, seq_len=32, batch_size=4,
                micro_batch_size=2, lr=3e-3, warmup_steps=3, eval_every=5, eval_rows=4, save_every=5, log_every=1,
                progress=False, val_fraction=0.2, shuffle_buffer=8, threads=1)
    base.update(kw)
    return TrainConfig(**base)


class _Kill(Exception):
    pass


def test_step_decreases_loss_on_fixed_batch(tmp_path):
    tr = Trainer(_cfg(tmp_path, steps=100, warmup_steps=0, weight_decay=0.0), model_factory=stand_in_factory,
                 log=lambda *_: None)
    tr._t0 = 0.0
    rows = [tr.stream.next_row() for _ in range(4)]
    losses = [tr._train_step(rows)[0] for _ in range(15)]
    tr.step = 0
    assert losses[-1] < losses[0] - 0.5, losses


@pytest.mark.parametrize("varlen", [False, True])
def test_resume_after_kill_reproduces_losses_exactly(tmp_path, varlen):
    full = train(_cfg(tmp_path, out_dir=str(tmp_path / "a"), varlen=varlen), model_factory=stand_in_factory,
                 log=lambda *_: None)

    def kill(step, loss):
        if step == 12:  # after the step-10 checkpoint, before the step-15 one
            raise _Kill

    with pytest.raises(_Kill):
        train(_cfg(tmp_path, out_dir=str(tmp_path / "b"), varlen=varlen), model_factory=stand_in_factory,
              on_step_end=kill, log=lambda *_: None)
    resumed = train(_cfg(tmp_path, out_dir=str(tmp_path / "b"), varlen=varlen, resume=True),
                    model_factory=stand_in_factory, log=lambda *_: None)
    assert sorted(resumed.losses) == list(range(11, 21))
    for s in range(11, 21):
        assert resumed.losses[s] == full.losses[s], (s, resumed.losses[s], full.losses[s])
    assert resumed.val_losses[20] == full.val_losses[20]
    # the metrics file reads like one uninterrupted run
    recs = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in recs if r["kind"] == "train"]
    assert steps == list(range(1, 21))
    a = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in recs if r["kind"] == "train"] == [r["loss"] for r in a if r["kind"] == "train"]


def test_grad_accumulation_matches_one_big_batch(tmp_path):
    a = train(_cfg(tmp_path, out_dir=str(tmp_path / "a"), micro_batch_size=1, steps=4), model_factory=stand_in_factory,
              log=lambda *_: None)
    b = train(_cfg(tmp_path, out_dir=str(tmp_path / "b"), micro_batch_size=4, steps=4), model_factory=stand_in_factory,
              log=lambda *_: None)
    for s in range(1, 5):
        assert abs(a.losses[s] - b.losses[s]) < 1e-5


@pytest.mark.parametrize("varlen", [False, True])
def test_grad_accumulation_gives_the_big_batch_gradient(tmp_path, varlen):
    """The gradients themselves (AdamW is blind to their scale, so equal losses after a step prove
    little): micro-batches of 1 row sum to the token-mean gradient of the whole 4-row batch."""
    # short documents of uneven length: with varlen the rows score different numbers of tokens, so
    # a plain mean of micro-batch means (instead of the token mean) shows
    d = tmp_path / "short"
    d.mkdir()
    for i in range(6):
        (d / f"s{i}.jsonl").write_text("\n".join(json.dumps({"text": "x" * (3 + (7 * i + 5 * j) % 29)})
                                                for j in range(40)))
    grads = {}
    for micro in (1, 4):
        tr = Trainer(_cfg(tmp_path, data=[str(d)], out_dir=str(tmp_path / f"m{micro}"), micro_batch_size=micro,
                          grad_clip=0.0, varlen=varlen), model_factory=stand_in_factory, log=lambda *_: None)
        tr._t0 = 0.0
        rows = [tr.stream.next_row() for _ in range(4)]
        captured = {}
        tr.optimizer.step = lambda captured=captured, model=tr.raw_model: captured.update(
            {n: p.grad.detach().clone() for n, p in model.named_parameters()})
        tr._train_step(rows)
        grads[micro] = captured
    assert grads[1].keys() == grads[4].keys() and grads[1]
    for n in grads[4]:
        torch.testing.assert_close(grads[1][n], grads[4][n], rtol=1e-5, atol=1e-7, msg=n)


def test_z_loss_adds_to_loss(tmp_path):
    a = train(_cfg(tmp_path, out_dir=str(tmp_path / "a"), steps=1), model_factory=stand_in_factory, log=lambda *_: None)
    b = train(_cfg(tmp_path, out_dir=str(tmp_path / "b"), steps=1, z_loss=1e-2), model_factory=stand_in_factory,
              log=lambda *_: None)
    assert b.losses[1] > a.losses[1] + 1e-3


def test_z_loss_value_is_ce_plus_mean_squared_logsumexp():
    """loss_and_count with z_loss: CE + z * mean(logsumexp(logits)^2) over the scored positions only."""
    from kimi_linear.train.modelio import loss_and_count
    from tests.train.stand_in import StandInLM

    torch.manual_seed(0)
    model = StandInLM(vocab_size=64)
    ids = torch.randint(0, 64, (3, 10))
    labels = ids.clone()
    labels[0, :4] = -100
    labels[2, 7] = -100
    batch = {"input_ids": ids, "labels": labels}
    with torch.no_grad():
        plain, n0 = loss_and_count(model, batch, 0.0)
        with_z, n1 = loss_and_count(model, batch, 1e-2)
        logits = model(ids).logits[:, :-1].double()
    keep = labels[:, 1:] != -100
    ce = F.cross_entropy(logits[keep], labels[:, 1:][keep])
    lse = torch.logsumexp(logits[keep], dim=-1)
    assert n0 == n1 == int(keep.sum())
    torch.testing.assert_close(plain.double(), ce, rtol=1e-5, atol=0.0)
    torch.testing.assert_close(with_z.double(), ce + 1e-2 * lse.square().mean(), rtol=1e-5, atol=0.0)


def test_bad_config_and_missing_files_fail_early(tmp_path):
    with pytest.raises(ValueError, match="seq_len"):
        TrainConfig(seq_len=1).validate()
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(schedule="linear").validate()
    with pytest.raises(ValueError, match="unknown keys"):
        TrainConfig.from_dict({"learning_rate": 1.0})
    with pytest.raises(FileNotFoundError, match="data path not found"):
        Trainer(_cfg(tmp_path, data=[str(tmp_path / "nope")]), model_factory=stand_in_factory)
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        Trainer(_cfg(tmp_path, tokenizer=str(tmp_path / "tok.json")), model_factory=stand_in_factory)
    with pytest.raises(FileNotFoundError, match="--resume"):
        Trainer(_cfg(tmp_path, resume=True), model_factory=stand_in_factory)
    with pytest.raises(ValueError, match="micro_batch_size"):
        Trainer(_cfg(tmp_path, batch_size=6, micro_batch_size=4), model_factory=stand_in_factory)
    train(_cfg(tmp_path, steps=1), model_factory=stand_in_factory, log=lambda *_: None)
    with pytest.raises(FileExistsError, match="already holds a run"):
        Trainer(_cfg(tmp_path, steps=1), model_factory=stand_in_factory)


def test_checkpoint_layout_and_pruning(tmp_path):
    r = train(_cfg(tmp_path, keep_checkpoints=2), model_factory=stand_in_factory, log=lambda *_: None)
    run = tmp_path / "run"
    assert (run / "latest").read_text().strip() == "model"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000010", "step-000015"]
    for name in ("config.json", "model.safetensors", "trainer_state.pt", "kimi_linear_tokenizer.json"):
        assert (r.final_dir / name).is_file()
    assert not [p for p in run.rglob(".tmp-*")]
    st = torch.load(r.final_dir / "trainer_state.pt", weights_only=False)
    assert st["step"] == 20 and st["data"]["rows_emitted"] == 20 * 4


def test_time_budget_run_ends_on_decayed_lr(tmp_path, monkeypatch):
    # A fake clock (each reading advances 50 ms) makes the run the same on any machine: the test checks
    # the budget logic (stop in time, reserve for the final eval/save, decayed lr), never wall time.
    from kimi_linear.train import trainer as trainer_mod

    ticks = itertools.count()
    monkeypatch.setattr(trainer_mod, "time", types.SimpleNamespace(perf_counter=lambda: 0.05 * next(ticks)))
    minutes = 0.2
    r = train(_cfg(tmp_path, steps=0, minutes=minutes, eval_every=0, save_every=0), model_factory=stand_in_factory,
              log=lambda *_: None)
    assert r.steps > 5 and r.elapsed_s <= minutes * 60
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    lrs = [x["lr"] for x in recs if x["kind"] == "train"]
    assert lrs[-1] < 0.5 * max(lrs)  # the schedule followed the time used down toward min_lr
    assert torch.load(r.final_dir / "trainer_state.pt", weights_only=False)["total_steps"] == r.steps
