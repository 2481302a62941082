"""Checkpoints in the official on-disk format: ``config.json`` + safetensors (+ index when sharded).

* Names are the model's ``state_dict()`` keys, which are the released checkpoint's names.
* Each tensor is written in the dtype the module holds (``A_log``, ``dt_bias`` and the router's
  ``e_score_correction_bias`` stay fp32 in a bf16 model) and loaded into the dtype the module holds.
* Above ``max_shard_size`` bytes the tensors go to ``model-0000i-of-0000n.safetensors`` with a
  ``model.safetensors.index.json`` (``metadata.total_size`` + ``weight_map``), as transformers writes.
* Saving is atomic: everything is written into a temporary sibling directory which then replaces the
  target (other files already in the target, e.g. a tokenizer, are carried over). A crash leaves the
  old checkpoint (or nothing), never a half-written one.
* Loading is strict by default: one error lists every missing, unexpected and mis-shaped tensor.
  transformers writes the dense first layer as ``block_sparse_moe.{gate,up,down}_proj``; those names
  are read as ``mlp.*``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from kimi_linear.model.config import KimiLinearConfig

if TYPE_CHECKING:
    from kimi_linear.model.modeling import KimiLinearForCausalLM

__all__ = ["save_pretrained", "load_state", "from_pretrained", "read_tensor_table", "CheckpointError",
           "SINGLE_FILE", "INDEX_FILE"]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_OURS = re.compile(r"^(config\.json|model\.safetensors(\.index\.json)?|model-\d+-of-\d+\.safetensors)$")
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}
_DENSE_ALIAS = re.compile(r"\.block_sparse_moe\.(gate_proj|up_proj|down_proj)\.")


class CheckpointError(ValueError):
    """A checkpoint does not match the model (the message lists every offending tensor)."""


def parse_size(size: int | str) -> int:
    """``5GB`` / ``500MB`` / ``1.5GiB`` / int bytes -> bytes."""
    if isinstance(size, int):
        if size < 1:
            raise ValueError(f"max_shard_size must be positive, got {size}")
        return size
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]i?B|B)?\s*", str(size), re.IGNORECASE)
    if not m:
        raise ValueError(f"max_shard_size must be an int (bytes) or like '5GB', got {size!r}")
    unit = (m.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[0]]
    return int(float(m.group(1)) * base**power)


# ---------------------------------------------------------------------------------------------- save
def _shards(state: dict[str, torch.Tensor], limit: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    return shards


def save_pretrained(model: KimiLinearForCausalLM, directory: str | os.PathLike, *,
                    max_shard_size: int | str = "5GB") -> None:
    """Write ``model`` (config + weights) to ``directory`` atomically. See the module docstring."""
    limit = parse_size(max_shard_size)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    # safetensors refuses tensors that share storage (packed experts are views of one buffer on a CPU
    # model, where .cpu() copies nothing): such tensors are written from copies
    seen: set[int] = set()
    for k, v in state.items():
        ptr = v.untyped_storage().data_ptr()
        if ptr in seen and v.numel():
            state[k] = v.clone()
        seen.add(ptr)
    if any(t.is_meta for t in state.values()):
        raise ValueError("cannot save a model on the meta device (it holds no values)")
    config: KimiLinearConfig = model.config
    dtypes = {t.dtype for n, t in state.items() if t.is_floating_point()}
    main = model.lm_head.weight.dtype
    config = config.replace(dtype=str(main).removeprefix("torch.")) if dtypes else config
    directory = os.path.abspath(os.fspath(directory))
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.tmp-", dir=parent)
    try:
        if os.path.isdir(directory):  # keep files that are not part of the checkpoint (tokenizer, ...)
            for entry in os.listdir(directory):
                if not _OURS.match(entry):
                    src = os.path.join(directory, entry)
                    (shutil.copytree if os.path.isdir(src) else shutil.copy2)(src, os.path.join(tmp, entry))
        config.save_pretrained(tmp)
        shards = _shards(state, limit)
        metadata = {"format": "pt"}
        if len(shards) == 1:
            save_file(shards[0], os.path.join(tmp, SINGLE_FILE), metadata=metadata)
        else:
            n = len(shards)
            weight_map: dict[str, str] = {}
            for i, shard in enumerate(shards, 1):
                fname = f"model-{i:05d}-of-{n:05d}.safetensors"
                save_file(shard, os.path.join(tmp, fname), metadata=metadata)
                weight_map.update({name: fname for name in shard})
            total = sum(t.numel() * t.element_size() for t in state.values())
            with open(os.path.join(tmp, INDEX_FILE), "w", encoding="utf-8") as fh:
                json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
                          fh, indent=2)
                fh.write("\n")
        _swap_in(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_in(tmp: str, directory: str) -> None:
    """Replace ``directory`` by the finished ``tmp`` with renames only."""
    if not os.path.exists(directory):
        os.replace(tmp, directory)
        return
    backup = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.old-", dir=os.path.dirname(directory))
    os.rmdir(backup)
    os.replace(directory, backup)
    try:
        os.replace(tmp, directory)
    except BaseException:
        os.replace(backup, directory)  # put the old checkpoint back
        raise
    shutil.rmtree(backup, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- load
def _files(directory: str) -> dict[str, str]:
    """Tensor name -> file, from the index or the single file."""
    index = os.path.join(directory, INDEX_FILE)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as fh:
            weight_map = json.load(fh)["weight_map"]
        return {name: os.path.join(directory, f) for name, f in weight_map.items()}
    single = os.path.join(directory, SINGLE_FILE)
    if os.path.isfile(single):
        with safe_open(single, framework="pt") as f:
            return {name: single for name in f.keys()}
    raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {directory}")


def read_tensor_table(directory: str | os.PathLike) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """``name -> (shape, dtype)`` of every tensor in a checkpoint, from the headers only (no data read)."""
    directory = os.fspath(directory)
    by_file: dict[str, list[str]] = {}
    for name, path in _files(directory).items():
        by_file.setdefault(path, []).append(name)
    table = {}
    for path, names in by_file.items():
        with safe_open(path, framework="pt") as f:
            for name in names:
                sl = f.get_slice(name)
                table[name] = (tuple(sl.get_shape()), _ST_DTYPES.get(sl.get_dtype(), sl.get_dtype()))
    return table


def _canonical(name: str, expected: dict[str, Any]) -> str:
    if name in expected:
        return name
    alias = _DENSE_ALIAS.sub(r".mlp.\1.", name)
    return alias if alias in expected else name


def _check(expected: dict[str, torch.Size], found: dict[str, tuple[int, ...]], strict: bool) -> None:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    shapes = sorted(f"{n}: checkpoint {tuple(found[n])} vs model {tuple(expected[n])}"
                    for n in set(expected) & set(found) if tuple(found[n]) != tuple(expected[n]))
    problems = []
    if missing and strict:
        problems.append(f"{len(missing)} missing: {missing}")
    if unexpected and strict:
        problems.append(f"{len(unexpected)} unexpected: {unexpected}")
    if shapes:
        problems.append(f"{len(shapes)} mis-shaped: {shapes}")
    if problems:
        raise CheckpointError("checkpoint does not match the model; " + "; ".join(problems))


@torch.no_grad()
def load_state(model: torch.nn.Module, directory: str | os.PathLike, *, strict: bool = True) -> None:
    """Copy every tensor of the checkpoint into ``model`` (cast to each tensor's current dtype/device).

    Nothing is written until all names and shapes are checked, so a mismatch never leaves a partly
    loaded model. On the meta device only the check runs.
    """
    directory = os.fspath(directory)
    targets = dict(model.state_dict(keep_vars=True))
    table = read_tensor_table(directory)
    found = {_canonical(n, targets): shape for n, (shape, _) in table.items()}
    _check({n: t.shape for n, t in targets.items()}, found, strict)
    if any(t.is_meta for t in targets.values()):
        return
    files = _files(directory)
    by_file: dict[str, list[str]] = {}
    for name, path in files.items():
        by_file.setdefault(path, []).append(name)
    for path, names in by_file.items():
        with safe_open(path, framework="pt") as f:
            for name in names:
                key = _canonical(name, targets)
                if key in targets:
                    targets[key].copy_(f.get_tensor(name))


def _resolve_dtype(dtype: torch.dtype | str | None, config: KimiLinearConfig) -> torch.dtype:
    if dtype is None:
        dtype = config.dtype or "float32"
    if isinstance(dtype, str):
        name = dtype.removeprefix("torch.")
        if not isinstance(getattr(torch, name, None), torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}")
        dtype = getattr(torch, name)
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating dtype, got {dtype}")
    return dtype


def from_pretrained(cls: type, directory: str | os.PathLike, *, device: str | torch.device = "cpu",
                    dtype: torch.dtype | str | None = None, backend: str = "auto", strict: bool = True,
                    **config_overrides: Any) -> KimiLinearForCausalLM:
    """Build ``cls`` from ``directory/config.json`` on ``device`` without initialising, then load."""
    directory = os.fspath(directory)
    config = KimiLinearConfig.from_pretrained(directory, **config_overrides)
    dt = _resolve_dtype(dtype, config)
    device = torch.device(device)
    with torch.device("meta"):
        model = cls(config, backend=backend, init=False)
    model = model.to(dtype=dt)  # the fp32-pinned tensors stay fp32
    if device.type != "meta":
        model = model.to_empty(device=device)
        for m in model.modules():  # non-persistent buffers are not in the checkpoint
            if hasattr(m, "reset_buffers"):
                m.reset_buffers()
        if not strict:  # tensors the checkpoint lacks get the usual initialisation, not garbage
            model.init_weights()
    load_state(model, directory, strict=strict)
    return model
