"""Training on several processes (torchrun): the few collective operations our own loops (PPO) need, each a no-op
in one process. TRL's trainers get the same from Accelerate; our PPO calls these instead of wrapping its model in
DDP, because its policy and critic are two adapters of one model switched between forward passes, which DDP's
hooks do not follow (``ppo.ppo_update``)."""

from __future__ import annotations

import os

import torch
from torch import Tensor


def init_distributed() -> None:
    """Under torchrun (WORLD_SIZE > 1), join the process group: gloo for CPU tensors, NCCL for CUDA ones."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():
        dist.init_process_group(backend="cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")


def world() -> tuple[int, int]:
    """(rank, number of processes): (0, 1) unless several processes train together (torchrun)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_sum(x: Tensor) -> Tensor:
    """x summed over every process's copy (x itself in one process)."""
    if world()[1] > 1:
        import torch.distributed as dist

        x = x.clone()
        dist.all_reduce(x)
    return x


def average_gradients(params: list[Tensor]) -> None:
    """Under torchrun: every gradient becomes its mean over processes (one all-reduce of all of them)."""
    n = world()[1]
    if n == 1:
        return
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= n
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset : offset + g.numel()].view_as(p).clone()
        offset += g.numel()


def gather_rows(rows: list[dict]) -> list[dict]:
    """Every process's records of one iteration, in prompt order (one process: ``rows`` itself)."""
    _, n = world()
    if n == 1:
        return rows
    import torch.distributed as dist

    parts = [None] * n
    dist.all_gather_object(parts, rows)
    # process r held prompts r, r + n, r + 2n, ...: interleave back into the iteration's order
    return [parts[r][i] for i in range(max(len(p) for p in parts)) for r in range(n) if i < len(parts[r])]
