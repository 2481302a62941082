"""The trainer's configuration: one dataclass, filled from defaults < a config file < command-line flags.

Every field is also a flag of ``kimi-linear train`` (``seq_len`` -> ``--seq-len``; booleans get
``--x`` / ``--no-x``; lists take several values). ``--config FILE`` reads JSON or TOML with the same
keys. ``--model-override KEY=VALUE`` (repeatable) sets model config fields (VALUE parsed as JSON
when it can be). :meth:`TrainConfig.validate` and :meth:`TrainConfig.check_paths` reject bad
values and missing files with messages naming the field, before any work starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path

SCHEDULES = ("cosine", "wsd", "constant")
PRECISIONS = ("auto", "bf16", "fp32")
DISTRIBUTED = ("auto", "ddp", "fsdp", "none")


@dataclass
class TrainConfig:
    # model
    model: str = "tiny"  # preset name, a config.json, or a checkpoint directory (its config.json)
    model_overrides: dict = field(default_factory=dict)
    init_from: str | None = None  # checkpoint directory whose weights start the run (fine-tuning)
    grad_checkpointing: bool = False
    # data
    tokenizer: str = "byte"  # "byte", a tokenizer.json, a tiktoken rank file, or a directory
    data: list[str] = field(default_factory=lambda: ["stdlib"])
    val_data: list[str] | None = None  # held-out files; default: a hashed split of `data` by file
    val_fraction: float = 0.02
    text_field: str = "text"
    seq_len: int = 256
    batch_size: int = 16  # rows per optimizer step, all ranks and accumulation steps together
    micro_batch_size: int | None = None  # rows per forward per rank (default: batch_size / world)
    varlen: bool = False  # per-document attention/state via cu_seqlens (needs model support)
    # rows in the shuffle buffer; None = about 1M tokens' worth (at least 64 rows). A buffer of a few
    # files' rows makes consecutive batches share files: on the quickstart a 512-row buffer (~4 files)
    # ended 300 steps at validation loss 2.35 with train loss 1.2, an 8192-row one at 2.08 / 1.66.
    shuffle_buffer: int | None = None
    # optimisation
    steps: int | None = 1000  # 0 or None: no step limit (then minutes sets the budget)
    minutes: float | None = None  # time budget; without steps the lr schedule follows the time used
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    schedule: str = "cosine"
    warmup_steps: int = 50
    decay_fraction: float = 0.2  # wsd: the share of steps spent decaying at the end
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables
    z_loss: float = 0.0
    moe_bias_update_rate: float = 1e-3  # aux-loss-free balancing step size; 0 disables
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    device: str = "auto"
    threads: int = 0  # CPU threads for torch; 0 = pick by a quick benchmark (1 wins on a busy machine)
    distributed: str = "auto"  # auto: DDP when launched by torchrun with >1 process
    seed: int = 0
    # bookkeeping
    out_dir: str = "runs/train"
    eval_every: int = 100
    eval_rows: int = 64
    save_every: int = 200
    keep_checkpoints: int = 2
    log_every: int = 10
    resume: bool = False
    overwrite: bool = False
    progress: bool = True

    # ------------------------------------------------------------------ validation
    def shuffle_rows(self) -> int:
        """Rows held by the training stream's shuffle buffer (``shuffle_buffer`` or ~1M tokens' worth)."""
        return self.shuffle_buffer or max(64, (1 << 20) // self.seq_len)

    def validate(self) -> TrainConfig:
        """Check values (not files). Returns self. Raises ValueError naming the field and value."""

        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(f"train config: {msg}")

        # 0 means "no limit" (so a flag can switch off a limit set in a config file)
        if self.steps == 0:
            self.steps = None
        if self.minutes == 0:
            self.minutes = None
        need(self.seq_len >= 2, f"seq_len must be >= 2, got {self.seq_len}")
        need(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        need(self.micro_batch_size is None or self.micro_batch_size >= 1,
             f"micro_batch_size must be >= 1, got {self.micro_batch_size}")
        need(self.steps is not None or self.minutes is not None, "give steps or minutes (or both)")
        need(self.steps is None or self.steps >= 1, f"steps must be >= 1, got {self.steps}")
        need(self.minutes is None or self.minutes > 0, f"minutes must be > 0, got {self.minutes}")
        need(self.lr > 0, f"lr must be > 0, got {self.lr}")
        need(0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        need(self.schedule in SCHEDULES, f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        need(self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}")
        need(0 < self.decay_fraction <= 1, f"decay_fraction must be in (0, 1], got {self.decay_fraction}")
        need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        need(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, f"betas must be in [0, 1), got ({self.beta1}, {self.beta2})")
        need(self.grad_clip >= 0, f"grad_clip must be >= 0, got {self.grad_clip}")
        need(self.z_loss >= 0, f"z_loss must be >= 0, got {self.z_loss}")
        need(self.moe_bias_update_rate >= 0, f"moe_bias_update_rate must be >= 0, got {self.moe_bias_update_rate}")
        need(self.precision in PRECISIONS, f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        need(self.distributed in DISTRIBUTED, f"distributed must be one of {DISTRIBUTED}, got {self.distributed!r}")
        need(0 <= self.val_fraction < 1, f"val_fraction must be in [0, 1), got {self.val_fraction}")
        need(self.eval_every >= 0 and self.save_every >= 0 and self.log_every >= 1,
             f"eval_every/save_every must be >= 0 and log_every >= 1, got {self.eval_every}/{self.save_every}/{self.log_every}")
        need(self.eval_rows >= 1, f"eval_rows must be >= 1, got {self.eval_rows}")
        need(self.keep_checkpoints >= 1, f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        need(self.threads >= 0, f"threads must be >= 0 (0 = auto), got {self.threads}")
        need(self.shuffle_buffer is None or self.shuffle_buffer >= 1, f"shuffle_buffer must be >= 1 or None, got {self.shuffle_buffer}")
        need(isinstance(self.data, list) and len(self.data) > 0, f"data must be a non-empty list of paths, got {self.data!r}")
        need(isinstance(self.model_overrides, dict), f"model_overrides must be a dict, got {type(self.model_overrides).__name__}")
        return self

    def check_paths(self) -> None:
        """Fail early, with the path, when a file the run needs is missing."""
        for p in list(self.data) + list(self.val_data or []):
            if p != "stdlib" and not os.path.exists(p):
                raise FileNotFoundError(f"train config: data path not found: {p}")
        if self.tokenizer != "byte" and not os.path.exists(self.tokenizer):
            raise FileNotFoundError(f"train config: tokenizer not found: {self.tokenizer} (use 'byte' or a local file)")
        if self.init_from is not None and not os.path.isdir(self.init_from):
            raise FileNotFoundError(f"train config: init_from checkpoint directory not found: {self.init_from}")
        looks_like_path = os.sep in self.model or self.model.endswith(".json")
        if looks_like_path and not os.path.exists(self.model):
            raise FileNotFoundError(f"train config: model config not found: {self.model}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"train config: unknown keys {unknown}; valid keys: {sorted(names)}")
        return cls(**d)


def read_config_file(path: str) -> dict:
    """A JSON or TOML file of TrainConfig keys (a ``[train]`` table in TOML is also accepted)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    if p.suffix.lower() == ".toml":
        try:
            import tomllib
        except ImportError:  # Python 3.10
            try:
                import tomli as tomllib  # type: ignore[no-redef]
            except ImportError as exc:
                raise ImportError("TOML config files need Python >= 3.11 or `pip install tomli`") from exc
        data = tomllib.loads(p.read_text(encoding="utf-8"))
        data = data.get("train", data)
    else:
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"config file {path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold an object of config keys")
    return data


def _field_types() -> dict[str, object]:
    return typing.get_type_hints(TrainConfig)


def add_config_arguments(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """One flag per TrainConfig field; every default is SUPPRESS so only given flags override."""
    parser.add_argument("--config", default=argparse.SUPPRESS, help="JSON or TOML file with config keys")
    parser.add_argument("--model-override", action="append", default=argparse.SUPPRESS, metavar="KEY=VALUE",
                        help="set a model config field (VALUE parsed as JSON when possible); repeatable")
    hints = _field_types()
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        if f.name in skip or f.name == "model_overrides":
            continue
        flag = "--" + f.name.replace("_", "-")
        tp = hints[f.name]
        default = getattr(defaults, f.name)
        help_ = f"(default: {default!r})"
        if tp is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_)
        elif "list" in str(tp):
            parser.add_argument(flag, dest=f.name, nargs="+", default=argparse.SUPPRESS, help=help_)
        else:
            base = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
            conv = base[0] if base[0] in (int, float, str) else str
            parser.add_argument(flag, dest=f.name, type=conv, default=argparse.SUPPRESS, help=help_)


def _parse_value(text: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def config_from_args(args: argparse.Namespace, base: TrainConfig | None = None) -> TrainConfig:
    """defaults (or ``base``) < ``--config`` file < flags given on the command line."""
    values = base.to_dict() if base is not None else TrainConfig().to_dict()
    given = vars(args)
    if "config" in given:
        values.update(read_config_file(given["config"]))
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    for k, v in given.items():
        if k in names:
            values[k] = v
    for item in given.get("model_override", []) or []:
        if "=" not in item:
            raise ValueError(f"--model-override expects KEY=VALUE, got {item!r}")
        key, val = item.split("=", 1)
        values.setdefault("model_overrides", {})
        values["model_overrides"] = {**values["model_overrides"], key.strip(): _parse_value(val)}
    return TrainConfig.from_dict(values).validate()
