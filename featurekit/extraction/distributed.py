"""Several processes, one extraction: a torchrun launch, or a shard, as featurekit sees it.

``torchrun --nproc-per-node 8 -m featurekit extract ...`` starts one process per GPU with
``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE`` set (several nodes: the same command on each node,
with ``--nnodes`` and a rendezvous; the output folder must be on a file system they share).

- Rank 0 alone holds the store locks; it tidies and opens each store's ``.partial/`` directory
  and decides what is left to do before any rank writes, and tells the others (a broadcast).
- Every rank extracts a contiguous block of the chunks still missing (:func:`extraction.shard`)
  and commits them into the shared partial directories.
- After a barrier rank 0 joins the chunks into the final store.

Features travel through the file system, not the network: the only messages are that broadcast
and barriers (gloo, on the CPU, so no NCCL is needed). A job that dies leaves whole chunks;
rerunning it, with any number of processes, extracts only what is missing.

Launchers without a rendezvous (Slurm arrays, Kubernetes indexed jobs) start independent
processes instead, each with ``--shard I/N`` (:class:`Shard`): the I-th of N contiguous blocks of
the chunk grid of each split. They share nothing but the file system (docs/scale-out.md).
"""

from __future__ import annotations

import datetime
import os
from typing import TypeVar

import torch.distributed as dist

from ..errors import SettingsError
from .settings import Launch

__all__ = ["barrier", "broadcast", "check_group"]

# Ranks wait at the barrier for the slowest one; blocks are balanced, but a slow disk or a
# skewed split must not turn a long extraction into a timeout.
BARRIER_TIMEOUT = datetime.timedelta(hours=24)

T = TypeVar("T")
def from_environment() -> Launch:
    """The launch torchrun describes in the environment; joins its process group when there are
    several processes. A plain ``python -m featurekit`` is rank 0 of 1."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Launch()
    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=BARRIER_TIMEOUT)
    return Launch(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")), world_size,
                  int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def check_group(world_size: int) -> None:
    """Raise :class:`SettingsError` when ``world_size`` > 1 but no process group joins the processes."""
    if world_size > 1 and not dist.is_initialized():
        raise SettingsError(f"world_size {world_size} needs the processes joined by torch.distributed: launch with "
                         "torchrun, or call featurekit.extraction.distributed.from_environment() in each process")


def barrier(world_size: int) -> None:
    if world_size > 1:
        dist.barrier()


def broadcast(value: T, world_size: int) -> T:
    """Rank 0's ``value`` on every rank (any picklable object)."""
    if world_size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
