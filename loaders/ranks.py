"""Which data-parallel rank this process is, and how many there are.

Data-parallel ranks each take their own slice of every global batch. Ranks
that split one model replica (tensor or sequence parallelism) must see the
*same* samples: they form a replication group of ``replicas`` consecutive
global ranks (the Megatron layout: global rank ``r`` is data-parallel rank
``r // replicas``), or pass the data-parallel process group explicitly.
"""

from __future__ import annotations

import os

import torch.distributed as dist


def data_parallel_rank(replicas: int = 1, group: dist.ProcessGroup | None = None) -> tuple[int, int]:
    """``(data-parallel rank, data-parallel world size)`` of this process.

    From ``group`` when given; else from ``torch.distributed`` when it is
    initialised, else from the ``RANK`` / ``WORLD_SIZE`` environment variables
    that ``torchrun`` sets (``LOCAL_RANK`` picks a device, not a data slice);
    then divided into replication groups of ``replicas`` consecutive ranks.
    """
    if group is not None:
        return dist.get_rank(group), dist.get_world_size(group)
    if dist.is_available() and dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
    else:
        rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if replicas < 1 or world_size % replicas:
        raise ValueError(f"world size {world_size} does not split into replication groups of {replicas} ranks")
    return rank // replicas, world_size // replicas
