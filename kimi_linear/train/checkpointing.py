"""Checkpoints: the model in the official format + tokenizer + trainer state, written atomically.

Layout of a run directory::

    RUN_DIR/
      train_config.json          the resolved TrainConfig
      metrics.jsonl              one JSON object per logged step / evaluation
      latest                     relative path of the newest complete checkpoint (replaced atomically)
      checkpoints/step-000200/   config.json + model safetensors (official names), tokenizer files,
                                 trainer_state.pt (optimizer, step, total steps, RNG states, data position)
      model/                     the final model (same content), what `from_pretrained` should load

A checkpoint is written into a hidden temporary directory and renamed into place, and ``latest`` is
replaced only afterwards, so a run killed at any instant leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

STATE_FILE = "trainer_state.pt"
LATEST = "latest"


def _write_atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_checkpoint(run_dir: str | os.PathLike, name: str, save_model, tokenizer, trainer_state: dict) -> Path:
    """Write ``run_dir/name`` atomically and point ``latest`` at it.

    Args:
        save_model: callable(directory) writing the model (config.json + safetensors) there.
        tokenizer: has ``save(directory)``.
        trainer_state: pickled with ``torch.save`` as ``trainer_state.pt``.
    """
    run_dir = Path(run_dir)
    final = run_dir / name
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_model(tmp)
    tokenizer.save(tmp)
    torch.save(trainer_state, tmp / STATE_FILE)
    if final.exists():
        old = final.parent / f".old-{final.name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _write_atomic_text(run_dir / LATEST, name + "\n")
    return final


def prune_checkpoints(run_dir: str | os.PathLike, keep: int) -> None:
    """Delete all but the newest ``keep`` ``checkpoints/step-*`` directories (never ``latest``'s)."""
    ckdir = Path(run_dir) / "checkpoints"
    if not ckdir.is_dir():
        return
    latest = latest_checkpoint(run_dir)
    steps = sorted(p for p in ckdir.iterdir() if p.is_dir() and p.name.startswith("step-"))
    for p in steps[:-keep]:
        if latest is None or p.resolve() != latest.resolve():
            shutil.rmtree(p, ignore_errors=True)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    pointer = Path(run_dir) / LATEST
    if not pointer.is_file():
        return None
    path = Path(run_dir) / pointer.read_text(encoding="utf-8").strip()
    return path if (path / STATE_FILE).is_file() else None


def load_trainer_state(checkpoint: str | os.PathLike) -> dict:
    path = Path(checkpoint) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {STATE_FILE} in {checkpoint}; not a trainer checkpoint")
    return torch.load(path, map_location="cpu", weights_only=False)


def truncate_metrics(path: str | os.PathLike, last_step: int) -> None:
    """Drop metric records after ``last_step`` (written by the killed run after its last checkpoint)."""
    path = Path(path)
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by the kill
        if rec.get("step", 0) <= last_step:
            kept.append(line)
    _write_atomic_text(path, "".join(k + "\n" for k in kept))


def read_metrics(path: str | os.PathLike) -> list[dict]:
    out = []
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"metrics file not found: {p}")
    for line in p.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out
