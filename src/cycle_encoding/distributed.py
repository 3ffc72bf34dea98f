"""Multi-process data parallel helpers: one code path for one process or many under ``torchrun``.
Design notes (why no DistributedDataParallel): docs/INTERNALS.md, "cycle_encoding.distributed"."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"  # where collective tensors live (CUDA for NCCL)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group when started by torchrun (WORLD_SIZE > 1); gloo on CPU, NCCL on CUDA."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        # Imported before the group exists, on purpose: these modules bind ``group.WORLD`` as default arguments
        # when first imported, and the first optimizer step imports them (torch._dynamo -> fsdp -> _shard ->
        # distributed.nn). Imported after init, those defaults keep the group alive past destroy_process_group(); its
        # gloo threads then free tensors during interpreter shutdown and abort the process ("terminate called without
        # an active exception") in about one exit in ten on a loaded machine. Imported here, they bind None.
        import torch.distributed.fsdp.sharded_grad_scaler
        import torch.distributed.nn
        import torch.distributed.optim

        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend)
    dev = f"cuda:{local}" if device.type == "cuda" else "cpu"
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=dev)


def rank_device(device: torch.device, info: DistInfo) -> torch.device:
    """The device of this rank: cuda:local_rank when the job runs on GPUs."""
    if device.type == "cuda" and info.enabled:
        return torch.device("cuda", info.local_rank)
    return device


def average_gradients(params: Iterable[nn.Parameter], info: DistInfo) -> None:
    """Average the gradients of ``params`` over all ranks (missing gradients count as zeros)."""
    if not info.enabled:
        return
    params = [p for p in params if p.requires_grad]
    if not params:
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= info.world_size
    for p, g in zip(params, flat.split([p.numel() for p in params]), strict=True):
        if p.grad is None:
            p.grad = g.view_as(p).clone()
        else:
            p.grad.copy_(g.view_as(p))


def broadcast_buffers(module: nn.Module, info: DistInfo) -> None:
    """Copy rank 0's floating-point buffers (BatchNorm statistics) to every rank."""
    if not info.enabled:
        return
    for b in module.buffers():
        dist.broadcast(b, src=0)


def broadcast_module(module: nn.Module, info: DistInfo) -> None:
    """Copy rank 0's parameters and buffers to every rank."""
    if not info.enabled:
        return
    with torch.no_grad():
        for p in module.parameters():
            dist.broadcast(p.data, src=0)
    broadcast_buffers(module, info)


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def all_reduce_mean(values: dict[str, float], info: DistInfo) -> dict[str, float]:
    """Mean over ranks of a dict of floats (for logging)."""
    if not info.enabled or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    t /= info.world_size
    return {k: float(v) for k, v in zip(keys, t.tolist())}


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    """Leave the process group. A barrier first, so that no rank tears its connections down while another still
    uses them: a rank that left early made its peer abort at exit ("terminate called without an active exception")
    now and then on a loaded machine."""
    if info.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
