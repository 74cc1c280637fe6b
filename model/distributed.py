"""Data-parallel training over ``torch.distributed``: N processes, one model copy each.

Every rank draws the same permutation (same seed), takes its slice of each global batch, and
the gradients are averaged with one all-reduce of a flat buffer per step, as DDP does; each
rank's data loss is weighted by its slice's share of the batch, so the averaged gradient is
exactly the full batch's and a 2-process run follows the single-process one up to float
summation order. Validation, early stopping and the scheduler see identical numbers on every
rank; only rank 0 writes files.

``kanmoe train --distributed N`` spawns N gloo processes on loopback; under ``torchrun`` (or
any launcher that sets ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``) the process group is joined
from the environment instead.

Hand-written rather than ``nn.parallel.DistributedDataParallel``: DDP's wrapper prefixes the
state dict, needs ``find_unused_parameters`` for locked edges and sparse top-k experts, and
buckets by backward order; one flat all-reduce after ``backward()`` has none of those issues
at these model sizes.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return rank_and_world()[0] == 0


def average_gradients(params: Iterable[nn.Parameter], world: int) -> None:
    """Mean of every parameter's gradient over the ranks (missing gradients count as 0)."""
    params = [p for p in params if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for p, g in zip(params, grads, strict=True):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(g).clone()
        offset += n


def all_sum(*values: float) -> list[float]:
    """Element-wise sum of a few floats over the ranks (epoch loss totals)."""
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, fn: Callable[..., Any], args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(*args)
    finally:
        dist.destroy_process_group()


def spawn(world: int, fn: Callable[..., Any], *args: Any) -> None:
    """Run ``fn(*args)`` in ``world`` processes joined by a gloo group on loopback."""
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(world, _free_port(), fn, args), nprocs=world, join=True)


def join_from_env() -> bool:
    """Join the process group a launcher (torchrun) described in the environment, if any."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        return True
    return False
