"""Data-parallel training on CPU (Gloo, 2 processes via torchrun): same loss curve as one process
with the same global batch, for DDP and FSDP2; and the checkpoint it writes resumes in one process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from kimi_linear.train.config import TrainConfig
from kimi_linear.train.trainer import train
from tests.train.stand_in import stand_in_factory

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def _cfg(tmp_path, name, **kw):
    d = tmp_path / "corpus"
    d.mkdir(exist_ok=True)
    for i in range(6):
        (d / f"doc{i}.txt").write_text(f"file {i}: " + " ".join(f"w{(i * 5 + j) % 17}" for j in range(300)))
    base = dict(data=[str(d)], out_dir=str(tmp_path / name), steps=6, seq_len=32, batch_size=4, micro_batch_size=1,
                lr=3e-3, warmup_steps=2, eval_every=3, eval_rows=4, save_every=3, log_every=1, progress=False,
                val_fraction=0.2, shuffle_buffer=8, threads=1, device="cpu")
    base.update(kw)
    return base


def _grad_norms(run_dir) -> dict[int, float]:
    """Per-step gradient norms (before clipping) from a run's metrics file: AdamW is blind to the
    gradients' scale, so equal losses alone would not show a wrong rank weighting."""
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["grad_norm"] for r in recs if r["kind"] == "train"}


def _torchrun(cfg: dict, real: bool = False) -> dict[int, float]:
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    for attempt in range(2):
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
             os.path.join(HERE, "dist_worker.py"), json.dumps(cfg)] + (["real"] if real else []),
            capture_output=True, text=True, env=env, timeout=300,
        )
        # now and then (session 13: 2 of ~20 runs of this file on the 2-core CPU box, code unchanged in
        # the trainer) a rank aborts as its process ends: a C++ thread still joinable at exit ("terminate
        # called without an active exception", SIGABRT). That one failure is run again, from an empty
        # run directory so that it is the same experiment; any other failure fails the test
        if proc.returncode != 0 and attempt == 0 and "terminate called without an active exception" in proc.stderr:
            shutil.rmtree(cfg["out_dir"], ignore_errors=True)
            continue
        break
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("LOSSES "))
    return {int(k): v for k, v in json.loads(line[len("LOSSES "):]).items()}


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one(tmp_path, mode):
    single = train(TrainConfig(**_cfg(tmp_path, "one")), model_factory=stand_in_factory, log=lambda *_: None)
    multi = _torchrun(_cfg(tmp_path, mode, distributed=mode))
    assert sorted(multi) == sorted(single.losses)
    for s in single.losses:
        assert abs(multi[s] - single.losses[s]) < 1e-4, (s, multi[s], single.losses[s])
    g1, g2 = _grad_norms(tmp_path / "one"), _grad_norms(tmp_path / mode)
    assert sorted(g1) == sorted(g2) == sorted(single.losses)
    for s in g1:
        assert abs(g2[s] - g1[s]) <= 1e-4 * g1[s], (s, g2[s], g1[s])
    # the checkpoint written by the distributed run continues in a single process
    resumed = train(TrainConfig(**_cfg(tmp_path, mode, distributed="none", steps=8, resume=True)),
                    model_factory=stand_in_factory, log=lambda *_: None)
    assert sorted(resumed.losses) == [7, 8]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one_real_model(tmp_path, mode):
    from tests.train.test_real_model import TINY

    kw = dict(model="tiny-moe", model_overrides=dict(TINY), moe_bias_update_rate=1e-2, steps=4, eval_every=2,
              save_every=2)
    single = train(TrainConfig(**_cfg(tmp_path, "one", **kw)), log=lambda *_: None)
    multi = _torchrun(_cfg(tmp_path, mode, distributed=mode, **kw), real=True)
    for s in single.losses:
        assert abs(multi[s] - single.losses[s]) < 1e-4, (s, multi[s], single.losses[s])
    g1, g2 = _grad_norms(tmp_path / "one"), _grad_norms(tmp_path / mode)
    for s in g1:
        assert abs(g2[s] - g1[s]) <= 1e-4 * g1[s], (s, g2[s], g1[s])
