"""Process-group facts for torchrun runs; a single process is rank 0 of 1."""

from __future__ import annotations

import os

import torch


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    """Rank 0 writes files; other ranks only compute."""
    return rank() == 0


def mean_across_ranks(value: torch.Tensor) -> torch.Tensor:
    if world_size() > 1 and torch.distributed.is_initialized():
        value = value.clone()
        torch.distributed.all_reduce(value)
        value /= world_size()
    return value


def device() -> torch.device:
    """This process's accelerator (cuda:LOCAL_RANK) when there is one, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")
