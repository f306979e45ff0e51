"""Training on more than one GPU (or CPU process) with DistributedDataParallel.

``torchrun --nproc_per_node=N -m helpers.train ...`` starts N copies of the same
program. Each copy (a *rank*) holds a full copy of the model, trains on its own
share of every epoch's shuffled samples (a distributed sampler deals them out),
and after each backward pass the gradients are averaged across ranks, so every
rank takes the same optimiser step and the weights stay identical.

torchrun tells each copy who it is through environment variables (``RANK``,
``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``). Without them
everything here is a no-op and training runs in one process.

The communication backend follows the device with PyTorch's own table (NCCL for
CUDA GPUs, gloo for CPUs), so no device is named here.

Example:
    >>> ctx = context()          # outside torchrun
    >>> ctx.world_size, ctx.is_main
    (1, True)
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    """Who this process is in a distributed run.

    Attributes:
        rank: this process's number, 0 to world_size - 1.
        local_rank: its number on this machine (picks the GPU).
        world_size: how many processes train together.
    """

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True for the process that prints, plots and writes files (rank 0)."""
        return self.rank == 0


def context() -> DistContext:
    """Read this process's place in a torchrun job from the environment (defaults: alone)."""
    return DistContext(
        rank=int(os.environ.get("RANK", 0)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
    )


def backend_for(device: torch.device) -> str:
    """The communication backend PyTorch recommends for a device type (gloo on CPUs)."""
    return dist.Backend.default_device_backend_map.get(torch.device(device).type, "gloo")


def local_device(device: torch.device, ctx: DistContext) -> torch.device:
    """The device this rank computes on: its own GPU (by local rank), or the CPU."""
    device = torch.device(device)
    if not ctx.is_distributed or device.type == "cpu":
        return device
    return torch.device(device.type, ctx.local_rank)


def setup(device: torch.device, ctx: DistContext | None = None) -> DistContext:
    """Join the process group if torchrun started this process; return the context.

    Safe to call more than once and outside torchrun (then it does nothing).
    """
    ctx = ctx or context()
    if ctx.is_distributed and not dist.is_initialized():
        device = local_device(device, ctx)
        if device.type != "cpu":
            getattr(torch, device.type).set_device(device)
        dist.init_process_group(backend=backend_for(device), rank=ctx.rank, world_size=ctx.world_size)
    return ctx


def teardown() -> None:
    """Leave the process group (if one was joined)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def broadcast_flag(flag: bool, device: torch.device, ctx: DistContext) -> bool:
    """Rank 0's decision (stop or go on), given to every rank so they stay in step."""
    if not ctx.is_distributed:
        return flag
    value = torch.tensor([1 if flag else 0], device=device)
    dist.broadcast(value, src=0)
    return bool(value.item())


def broadcast_value(value: float, device: torch.device, ctx: DistContext) -> float:
    """Rank 0's number (for example its training clock), given to every rank."""
    if not ctx.is_distributed:
        return value
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.broadcast(tensor, src=0)
    return float(tensor.item())


def barrier(ctx: DistContext) -> None:
    """Wait until every rank reaches this point."""
    if ctx.is_distributed and dist.is_initialized():
        dist.barrier()
