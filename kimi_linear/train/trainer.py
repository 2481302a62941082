"""The training loop: ``kimi-linear train`` and the quickstart both run :class:`Trainer`.

One optimizer step = ``batch_size`` rows of ``seq_len`` tokens, split over ranks and then into
micro-batches of ``micro_batch_size`` rows (gradient accumulation). Each micro-batch's mean loss is
weighted by its share of the step's scored tokens, so the update equals the one of a single big
batch whatever the split. Then: gradient clipping, AdamW, the MoE balancing update, logging,
evaluation and checkpoints. ``resume`` restores the model, optimizer, step counter, fitted step
budget, RNG states and the data stream's exact position from the newest checkpoint: on CPU the
resumed run reproduces the uninterrupted run's losses bit for bit.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from kimi_linear.train import checkpointing as ck
from kimi_linear.train import distributed as dd
from kimi_linear.train.config import TrainConfig
from kimi_linear.train.corpus import list_files, split_files
from kimi_linear.train.data import PackedStream, Row, collate, validation_rows
from kimi_linear.train.modelio import (
    build_model,
    enable_grad_checkpointing,
    load_weights,
    loss_and_count,
    moe_balance_step,
    supports_varlen,
)
from kimi_linear.train.optim import build_optimizer, lr_at
from kimi_linear.train.tokenizers import Tokenizer, load_tokenizer


@dataclass
class TrainResult:
    run_dir: Path
    final_dir: Path | None
    steps: int
    losses: dict[int, float] = field(default_factory=dict)  # optimizer step (1-based) -> train loss
    val_losses: dict[int, float] = field(default_factory=dict)
    tokens_per_s: float = 0.0
    elapsed_s: float = 0.0


class Trainer:
    """Set up everything from a :class:`TrainConfig`, then :meth:`run`.

    Args:
        cfg: the configuration (validated here).
        model_factory: ``callable(cfg, tokenizer) -> nn.Module``; default builds KimiLinearForCausalLM.
            Tests pass small stand-ins.
        on_step_end: ``callable(step, loss)`` after each optimizer step (tests use it to simulate a kill).
    """

    def __init__(self, cfg: TrainConfig, *, model_factory: Callable | None = None,
                 on_step_end: Callable[[int, float], None] | None = None, log: Callable[[str], None] = print):
        self.cfg = cfg.validate()
        cfg.check_paths()
        self.on_step_end = on_step_end
        self.info = dd.setup(cfg.device)
        self.log = log if self.info.is_main else (lambda *_: None)
        self.run_dir = Path(cfg.out_dir)
        self._check_run_dir()
        self.tokenizer: Tokenizer = load_tokenizer(cfg.tokenizer)
        # data first: missing or empty corpora fail before a model is built
        files = list_files(cfg.data)
        if cfg.val_data:
            self.train_files, self.val_files = files, list_files(cfg.val_data)
            overlap = {str(f.path.resolve()) for f in files} & {str(f.path.resolve()) for f in self.val_files}
            if overlap:
                raise ValueError(f"val_data overlaps the training data: {sorted(overlap)[:3]}")
        else:
            self.train_files, self.val_files = split_files(files, cfg.val_fraction, cfg.seed)
        self._setup_batches()
        self.threads = dd.pick_cpu_threads(cfg.threads, self.log) if self.info.device.type == "cpu" else 0
        self._seed_everything(cfg.seed)
        self.model_factory = model_factory or build_model
        model = self.model_factory(cfg, self.tokenizer)
        if cfg.varlen and not supports_varlen(model):
            raise ValueError(f"varlen=True but {type(model).__name__}.forward takes no cu_seqlens argument")
        if cfg.grad_checkpointing:
            enable_grad_checkpointing(model)
        self.resume_from = None
        if cfg.resume:
            self.resume_from = ck.latest_checkpoint(self.run_dir)
            if self.resume_from is None:
                raise FileNotFoundError(f"--resume: no complete checkpoint under {self.run_dir} (missing '{ck.LATEST}')")
            load_weights(model, self.resume_from)
        self.raw_model = model.to(self.info.device)
        self.model, self.dist_mode = dd.wrap_model(self.raw_model, self.info, cfg.distributed)
        self.optimizer = build_optimizer(self.model, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                         betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
        self.stream = PackedStream(self.train_files, self.tokenizer.encode, self.tokenizer.eos_id, cfg.seq_len,
                                   seed=cfg.seed, shuffle_buffer=cfg.shuffle_rows(), text_field=cfg.text_field)
        self.val_rows: list[Row] = []
        if self.val_files:
            self.val_rows = validation_rows(self.val_files, self.tokenizer.encode, self.tokenizer.eos_id, cfg.seq_len,
                                            cfg.eval_rows, cfg.text_field)
        self.step = 0
        self.total_steps: int | None = cfg.steps
        self.elapsed_before = 0.0
        self.tokens_seen = 0
        if self.resume_from is not None:
            self._load_state(ck.load_trainer_state(self.resume_from))

    # ------------------------------------------------------------------ setup helpers
    def _check_run_dir(self) -> None:
        cfg = self.cfg
        existing = (self.run_dir / ck.LATEST).exists() or (self.run_dir / "metrics.jsonl").exists()
        if existing and not cfg.resume:
            if not cfg.overwrite:
                raise FileExistsError(f"{self.run_dir} already holds a run; pass --resume to continue it, "
                                      f"--overwrite to replace it, or another --out-dir")
            if self.info.is_main:
                for name in ("checkpoints", "model"):
                    shutil.rmtree(self.run_dir / name, ignore_errors=True)
                for name in (ck.LATEST, "metrics.jsonl", "train_config.json", "loss.png"):
                    (self.run_dir / name).unlink(missing_ok=True)
            dd.barrier(self.info)

    def _setup_batches(self) -> None:
        cfg, world = self.cfg, self.info.world
        if cfg.batch_size % world:
            raise ValueError(f"batch_size={cfg.batch_size} must be divisible by the number of ranks ({world})")
        self.rows_per_rank = cfg.batch_size // world
        self.micro = cfg.micro_batch_size or self.rows_per_rank
        if self.rows_per_rank % self.micro:
            raise ValueError(f"rows per rank ({self.rows_per_rank} = batch_size {cfg.batch_size} / {world} ranks) must be "
                             f"divisible by micro_batch_size={self.micro}")
        self.grad_accum = self.rows_per_rank // self.micro

    @staticmethod
    def _seed_everything(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    def _autocast(self):
        dev, prec = self.info.device, self.cfg.precision
        if dev.type == "cuda" and prec in ("auto", "bf16"):
            return torch.autocast("cuda", dtype=torch.bfloat16)
        if dev.type == "cpu" and prec == "bf16":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # ------------------------------------------------------------------ state
    def _state(self) -> dict:
        return {
            "step": self.step,
            "total_steps": self.total_steps,
            "elapsed_s": self.elapsed_before + (time.perf_counter() - self._t0),
            "tokens_seen": self.tokens_seen,
            "optimizer": dd.full_optimizer_state(self.model, self.optimizer, self.dist_mode),
            "rng": ck.rng_state(),
            "data": self.stream.state_dict(),
            "config": self.cfg.to_dict(),
            "world": self.info.world,
            "threads": self.threads,
        }

    def _load_state(self, st: dict) -> None:
        self.step = int(st["step"])
        self.total_steps = st["total_steps"] if self.cfg.steps is None else self.cfg.steps
        self.elapsed_before = float(st["elapsed_s"])
        self.tokens_seen = int(st["tokens_seen"])
        dd.load_full_optimizer_state(self.model, self.optimizer, st["optimizer"], self.dist_mode)
        self.stream.load_state_dict(st["data"])
        if self.cfg.threads == 0 and st.get("threads") and self.info.device.type == "cpu":
            torch.set_num_threads(st["threads"])  # same thread count as before: same float summation order
            self.threads = st["threads"]
        ck.set_rng_state(st["rng"])  # last: building the model and streams must not disturb it

    def _save_model_fn(self):
        if self.dist_mode == "fsdp":
            full = dd.full_model_state(self.model, "fsdp")  # collective: every rank takes part

            def save(directory):
                fresh = self.model_factory(self.cfg, self.tokenizer)
                fresh.load_state_dict(full)
                fresh.save_pretrained(directory)
            return save
        return lambda directory: self.raw_model.save_pretrained(directory)

    def save(self, name: str) -> Path | None:
        save_model = self._save_model_fn()
        state = self._state()
        path = None
        if self.info.is_main:
            path = ck.write_checkpoint(self.run_dir, name, save_model, self.tokenizer, state)
            ck.prune_checkpoints(self.run_dir, self.cfg.keep_checkpoints)
        dd.barrier(self.info)
        return path

    # ------------------------------------------------------------------ steps
    def _train_step(self, rows: list[Row], fraction: float | None = None) -> tuple[float, float]:
        cfg, info = self.cfg, self.info
        mine = rows[info.rank * self.rows_per_rank:(info.rank + 1) * self.rows_per_rank]
        # scored tokens of the whole step, identical on every rank (all ranks see all rows)
        n_total = sum(int((collate(rows[i:i + self.micro], varlen=cfg.varlen)["labels"][:, 1:] != -100).sum())
                      for i in range(0, len(rows), self.micro))
        lr = lr_at(self.step, total=self.total_steps or 10**9, lr=cfg.lr, warmup=cfg.warmup_steps,
                   schedule=cfg.schedule, min_lr_ratio=cfg.min_lr_ratio, decay_fraction=cfg.decay_fraction,
                   fraction=fraction)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.model.train()
        loss_sum = torch.zeros((), dtype=torch.float64)
        for i in range(self.grad_accum):
            batch = {k: v.to(info.device) for k, v in collate(mine[i * self.micro:(i + 1) * self.micro],
                                                               varlen=cfg.varlen).items()}
            last = i == self.grad_accum - 1
            sync = contextlib.nullcontext()
            if not last and self.dist_mode == "ddp":
                sync = self.model.no_sync()
            elif self.dist_mode == "fsdp":
                self.model.set_requires_gradient_sync(last)
            with sync:
                with self._autocast():
                    loss, n = loss_and_count(self.model, batch, cfg.z_loss)
                # DDP/FSDP average gradients over ranks; weighting by world * n / n_total turns that
                # average into the token-mean over the whole global batch.
                (loss * (n * info.world / max(n_total, 1))).backward()
            loss_sum += loss.detach().double().cpu() * n
        loss_sum = dd.all_reduce_sum(loss_sum.to(info.device), info).cpu()
        if cfg.grad_clip > 0:
            gn = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        else:
            gn = torch.nn.utils.clip_grad_norm_(self.model.parameters(), float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        reduce = (lambda t: dd.all_reduce_sum(t, info)) if info.world > 1 else None
        self.moe_stats = moe_balance_step(self.raw_model, cfg.moe_bias_update_rate, reduce)
        return float(loss_sum) / max(n_total, 1), float(gn.full_tensor() if hasattr(gn, "full_tensor") else gn)

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Token-mean loss over the fixed validation rows (nats/token), or None without a split."""
        if not self.val_rows:
            return None
        info = self.info
        mine = self.val_rows[info.rank::info.world]
        self.model.eval()
        tot = torch.zeros(2, dtype=torch.float64)
        for i in range(0, len(mine), self.micro):
            batch = {k: v.to(info.device) for k, v in collate(mine[i:i + self.micro], varlen=self.cfg.varlen).items()}
            with self._autocast():
                loss, n = loss_and_count(self.model, batch, 0.0)
            tot += torch.tensor([float(loss) * n, n], dtype=torch.float64)
        tot = dd.all_reduce_sum(tot.to(info.device), info).cpu()
        self.model.train()
        return float(tot[0] / tot[1].clamp_min(1))

    # ------------------------------------------------------------------ loop
    def _write_metrics(self, rec: dict) -> None:
        if self.info.is_main:
            with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(rec) + "\n")

    def run(self) -> TrainResult:
        cfg, info = self.cfg, self.info
        if info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
            if self.resume_from is not None:
                ck.truncate_metrics(self.run_dir / "metrics.jsonl", self.step)
        dd.barrier(info)
        n_params = sum(p.numel() for p in self.raw_model.parameters())
        self.log(f"model: {type(self.raw_model).__name__}, {n_params / 1e6:.2f}M parameters | device {info.device} x "
                 f"{info.world} ({self.dist_mode}) | batch {cfg.batch_size} x {cfg.seq_len} tokens, "
                 f"{self.grad_accum} micro-batch(es) of {self.micro} per rank")
        if self.resume_from is not None:
            self.log(f"resumed from {self.resume_from} at step {self.step}")
        result = TrainResult(self.run_dir, None, self.step)
        self._t0 = time.perf_counter()
        budget = cfg.minutes * 60 if cfg.minutes else None
        t_eval = 0.0
        if self.step == 0 and cfg.eval_every and self.val_rows:
            te = time.perf_counter()
            v = self.evaluate()
            t_eval = time.perf_counter() - te
            result.val_losses[0] = v
            self._write_metrics({"kind": "eval", "step": 0, "val_loss": v, "elapsed_s": 0.0})
        # Time-budget mode (minutes, no steps): the schedule follows the share of the budget used, so a
        # machine that slows down mid-run still ends on the decayed learning rate; the step total
        # shown is an estimate. The final evaluation and save are reserved out of the budget.
        time_mode = cfg.steps is None
        reserve = 1.5 * t_eval + 2.0
        tokens_per_step = cfg.batch_size * cfg.seq_len
        bar = self._progress()
        tok_rate = 0.0
        stopped_on_time = False
        t_loop, step_loop = time.perf_counter(), self.step
        while True:
            elapsed = self.elapsed_before + time.perf_counter() - self._t0
            fraction = None
            if time_mode:
                fraction = elapsed / max(budget - reserve, 1e-9)
                if fraction >= 1.0:
                    break
            elif self.step >= self.total_steps:
                break
            elif budget is not None and elapsed >= budget:
                stopped_on_time = True
                break
            t_step = time.perf_counter()
            rows = [self.stream.next_row() for _ in range(cfg.batch_size)]
            loss, gnorm = self._train_step(rows, fraction)
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss became {loss} at step {self.step + 1}; lower lr or enable z_loss")
            self.step += 1
            self.tokens_seen += tokens_per_step
            dt = time.perf_counter() - t_step
            tok_rate = tokens_per_step / dt if tok_rate == 0 else 0.8 * tok_rate + 0.2 * tokens_per_step / dt
            result.losses[self.step] = loss
            if time_mode and bar is not None and self.step - step_loop >= 3:
                per_step = (time.perf_counter() - t_loop) / (self.step - step_loop)
                left = budget - reserve - (self.elapsed_before + time.perf_counter() - self._t0)
                bar.total = self.step + max(0, int(left / per_step))
            if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                self._write_metrics({"kind": "train", "step": self.step, "loss": loss, "lr": self.optimizer.param_groups[0]["lr"],
                                     "grad_norm": gnorm, "tokens": self.tokens_seen, "tok_per_s": tok_rate,
                                     "elapsed_s": self.elapsed_before + time.perf_counter() - self._t0,
                                     **({"moe_max_over_mean": self.moe_stats["max_over_mean"]}
                                        if isinstance(self.moe_stats, dict) and "max_over_mean" in self.moe_stats else {})})
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step != self.total_steps:
                te = time.perf_counter()
                v = self.evaluate()
                if v is not None:
                    result.val_losses[self.step] = v
                    self._write_metrics({"kind": "eval", "step": self.step, "val_loss": v,
                                         "elapsed_s": self.elapsed_before + time.perf_counter() - self._t0})
                t_eval = time.perf_counter() - te
                reserve = 1.5 * t_eval + 2.0
            if bar is not None:
                post = {"loss": f"{loss:.3f}", "tok/s": f"{tok_rate:,.0f}"}
                if result.val_losses:
                    post["val"] = f"{result.val_losses[max(result.val_losses)]:.3f}"
                bar.set_postfix(post, refresh=False)
                bar.update(1)
            if self.on_step_end is not None:
                self.on_step_end(self.step, loss)
            if cfg.save_every and self.step % cfg.save_every == 0 and self.step != self.total_steps:
                self.save(f"checkpoints/step-{self.step:06d}")
        if bar is not None:
            bar.close()
        if stopped_on_time:
            self.log(f"time budget of {cfg.minutes} min reached at step {self.step}")
        if time_mode:
            self.total_steps = self.step
        v = self.evaluate()
        if v is not None:
            result.val_losses[self.step] = v
            self._write_metrics({"kind": "eval", "step": self.step, "val_loss": v,
                                 "elapsed_s": self.elapsed_before + time.perf_counter() - self._t0})
        result.final_dir = self.save("model")
        result.steps = self.step
        result.tokens_per_s = tok_rate
        result.elapsed_s = self.elapsed_before + time.perf_counter() - self._t0
        return result

    def _progress(self):
        if not (self.cfg.progress and self.info.is_main):
            return None
        import sys

        from tqdm.auto import tqdm

        interval = 0.5 if sys.stderr.isatty() else 30.0  # logs: a line every 30 s, not every step
        return tqdm(total=self.total_steps, initial=self.step, unit="step", dynamic_ncols=True, desc="train",
                    mininterval=interval)

    def close(self, synchronise: bool = False) -> None:
        """Leave the process group. ``synchronise`` (after a run that ended normally): a barrier first, so
        no rank tears Gloo down while another still finishes its last collective (a 2-process CPU run
        once aborted at exit with "terminate called without an active exception"). Not after an error:
        the other ranks may never reach the barrier."""
        if synchronise:
            dd.barrier(self.info)
        dd.teardown(self.info)


def train(cfg: TrainConfig, **kwargs) -> TrainResult:
    """Build a :class:`Trainer` and run it to the end."""
    trainer = Trainer(cfg, **kwargs)
    ended = False
    try:
        result = trainer.run()
        ended = True
        return result
    finally:
        trainer.close(synchronise=ended)
