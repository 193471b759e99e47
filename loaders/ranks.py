"""Which data-parallel rank this process is, and how many there are."""

from __future__ import annotations

import os

import torch.distributed as dist


def data_parallel_rank() -> tuple[int, int]:
    """``(rank, world_size)`` from ``torch.distributed`` when initialised, else ``RANK``/``WORLD_SIZE``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
