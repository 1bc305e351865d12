"""Work shared by the processes torchrun starts: training (lifeiqa_fast.train) and scoring (lifeiqa-fast score)."""
from __future__ import annotations

import os
from collections.abc import Callable

import torch
import torch.distributed as dist


def join() -> tuple[int, int]:
    """(rank, world size), joining the process group that torchrun describes in the environment (NCCL
    where CUDA is, gloo on CPUs); (0, 1) outside torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def local_device() -> torch.device:
    """This process's device: cuda:LOCAL_RANK where CUDA is, else the CPU."""
    return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")


def sharded(items: list, work: Callable[[list], list]) -> list:
    """work(share) in every process of the group, each on its share of items (every world-th, from its
    rank), and every result gathered in items' order on every process; work(items) with no group.
    work returns one picklable result per item of its share (and is called with [] for an empty one)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return work(items)
    rank, world = dist.get_rank(), dist.get_world_size()
    parts: list = [None] * world
    dist.all_gather_object(parts, work(items[rank::world]))
    ordered: list = [None] * len(items)
    for r, part in enumerate(parts):
        ordered[r::world] = part
    return ordered


def agree(value, source: int = 0):
    """value as the process of rank source has it, on every process (itself with no group)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=source)
    return box[0]
