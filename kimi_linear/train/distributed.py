"""One code path for CPU, one GPU and N GPUs (``torchrun``): DDP or FSDP2 (``fully_shard``).

The same command runs everywhere: launched by ``torchrun --nproc-per-node N`` the environment holds
``WORLD_SIZE`` / ``RANK`` / ``LOCAL_RANK`` and we join the process group (NCCL on CUDA, Gloo on
CPU); launched plainly it is a world of one. Every rank reads the same global batch from the same
seeded stream and keeps its own slice of rows, so the global batch -- and with it the loss curve --
does not depend on the number of ranks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    world: int = 1
    rank: int = 0
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialised_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device_spec: str = "auto") -> DistInfo:
    """Join the process group when launched by torchrun; pick this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_spec == "auto":
        device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    else:
        device = torch.device(device_spec)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={device_spec!r} but CUDA is not available here; use --device cpu or auto")
        if device.type == "cuda" and device.index is None:
            device = torch.device(f"cuda:{local_rank}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    info = DistInfo(world=world, rank=rank, local_rank=local_rank, device=device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        info.initialised_here = True
    return info


def pick_cpu_threads(requested: int, log=None) -> int:
    """Set torch's CPU thread count: ``requested`` if > 0, else the faster of all cores and one.

    Why: small training ops on a CPU that something else is also using can run 10-100x slower with
    several OpenMP threads (every parallel region waits for a thread the OS has parked), while
    one thread is unaffected. A short matmul benchmark at start-up tells the two cases apart.
    """
    import time

    if requested > 0:
        torch.set_num_threads(requested)
        return requested
    most = torch.get_num_threads()
    if most <= 1:
        return most
    x, w = torch.randn(1024, 128), torch.randn(384, 128)

    def bench(n: int) -> float:
        torch.set_num_threads(n)
        for _ in range(3):
            torch.nn.functional.linear(x, w)
        t = time.perf_counter()
        for _ in range(30):
            torch.nn.functional.linear(x, w).sum()
        return time.perf_counter() - t

    t_most, t_one = bench(most), bench(1)
    choice = most if t_most <= t_one else 1
    torch.set_num_threads(choice)
    if log is not None:
        log(f"cpu threads: {choice} (benchmark: {most} threads {t_most * 1e3:.1f} ms, 1 thread {t_one * 1e3:.1f} ms)")
    return choice


def teardown(info: DistInfo) -> None:
    if info.initialised_here and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier(info: DistInfo) -> None:
    if info.world > 1:
        dist.barrier()


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks to shard one by one (the first ModuleList named ``layers``)."""
    for name, mod in model.named_modules():
        if name.endswith("layers") and isinstance(mod, torch.nn.ModuleList):
            return list(mod)
    return []


def wrap_model(model: torch.nn.Module, info: DistInfo, mode: str) -> tuple[torch.nn.Module, str]:
    """Wrap for data parallelism. Returns the model to train and the mode used (none|ddp|fsdp)."""
    if mode == "auto":
        mode = "ddp" if info.world > 1 else "none"
    if mode == "none" or info.world == 1:
        return model, "none"
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [info.device.index] if info.device.type == "cuda" else None
        # MoE routers may leave some experts without tokens in a step. Buffers are not broadcast:
        # per-rank MoE load counters must stay per rank (they are summed before each bias update,
        # which every rank then applies identically).
        return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True,
                                       broadcast_buffers=False), "ddp"
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in decoder_layers(model):
            fully_shard(block)
        fully_shard(model)
        return model, "fsdp"
    raise ValueError(f"distributed must be auto, none, ddp or fsdp, got {mode!r}")


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model.module, torch.nn.Module) else model


def full_model_state(model: torch.nn.Module, mode: str) -> dict[str, torch.Tensor]:
    """A full (unsharded) CPU state dict on every rank."""
    if mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, mode: str) -> dict:
    if mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return optimizer.state_dict()


def load_full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict, mode: str) -> None:
    if mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state)


def load_full_model_state(model: torch.nn.Module, state: dict, mode: str) -> None:
    if mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))
    else:
        unwrap(model).load_state_dict(state)
