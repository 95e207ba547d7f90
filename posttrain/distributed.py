"""torch.distributed in one place: process group, sharding, reductions, rank-0 writes.

    torchrun --standalone --nproc_per_node 2 -m posttrain dpo --dataset_name pairs.jsonl
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 -m posttrain grpo ...

A single process (no WORLD_SIZE in the environment) is rank 0 of 1: no
process group, no wrapping, every reduction the identity — exactly the
single-process run. Under torchrun:

- ``process_group()`` initialises the group once (NCCL on CUDA, each rank on
  cuda:LOCAL_RANK; gloo on CPU) and destroys it at the end, also on error.
- ``wrap(module, cfg)`` makes a trained module data parallel in place:
  DDP (``replicate``, the composable DistributedDataParallel) by default,
  FSDP2 (``fully_shard`` per decoder layer, then the root) with ``fsdp``.
  The module keeps its class, so ``generate``, ``config`` and peft's methods
  work as before; forwards that train must go through the module itself.
- ``sync_gradients(modules, flag)`` turns the gradient all-reduce off for the
  micro-batches of an accumulation but the last (DDP's ``no_sync``).
- ``rank_share(rows)`` is this rank's contiguous slice of a global batch;
  ``all_sum`` / ``all_mean`` / ``all_gather`` reduce statistics.
- ``is_main()`` gates every write of the output folder but checkpoint shards.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable

import torch
from torch import nn


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Rank 0 writes files; other ranks only compute."""
    return rank() == 0


def is_distributed() -> bool:
    return world_size() > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()


def device() -> torch.device:
    """This process's accelerator (cuda:LOCAL_RANK) when there is one, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank())
    return torch.device("cpu")


@contextlib.contextmanager
def process_group():
    """Initialise the process group for a torchrun launch (a no-op for one process); always destroy it."""
    started = False
    if world_size() > 1 and not torch.distributed.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank())
            torch.distributed.init_process_group("nccl", device_id=device())
        else:
            torch.distributed.init_process_group("gloo")
        started = True
    try:
        yield
    finally:
        if started and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        torch.distributed.barrier()


# ------------------------------------------------------------------ reductions


def all_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum of ``value`` over ranks (a new tensor; ``value`` itself for one process)."""
    if not is_distributed():
        return value
    value = value.detach().clone().to(device())
    torch.distributed.all_reduce(value)
    return value


def all_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of ``value`` over ranks."""
    return all_sum(value) / world_size() if is_distributed() else value


def all_gather(value: torch.Tensor) -> torch.Tensor:
    """Every rank's ``value`` (same shape on every rank), concatenated along dim 0 in rank order."""
    if not is_distributed():
        return value
    local = value.detach().contiguous().to(device())
    parts = [torch.empty_like(local) for _ in range(world_size())]
    torch.distributed.all_gather(parts, local)
    return torch.cat(parts).to(value.device)


def any_rank(flag: bool) -> bool:
    """True when ``flag`` is true on some rank: decisions every rank must take together."""
    if not is_distributed():  # (no device tensor, no sync, for one process)
        return flag
    return bool(all_sum(torch.tensor(float(flag), device=device())) > 0)


def rank_share(rows: list) -> list:
    """This rank's contiguous share of a global batch: N ranks together see exactly ``rows``.

    Shares differ by at most one row when the batch does not divide; the
    caller weights each rank by its rows, so the gradient is the global one.
    """
    n, r = world_size(), rank()
    size, extra = divmod(len(rows), n)
    start = r * size + min(r, extra)
    return rows[start:start + size + (r < extra)]


# ------------------------------------------------------------------ wrapping


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks of a Hugging Face model (through peft and scalar-head wrappers)."""
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) and type(module[0]).__name__.endswith(
                ("DecoderLayer", "Block", "Layer")):
            return list(module)
    return []


def wrap(module: nn.Module, fsdp: bool = False, bf16: bool = False, frozen: bool = False) -> nn.Module:
    """Data parallel in place: DDP (``replicate``) or FSDP2 (``fully_shard``); unchanged for one process.

    Under FSDP2 each decoder layer is its own unit (its weights are gathered
    just for its forward and backward), then the root takes the rest
    (embeddings, norm, head); with bf16 the parameters compute in bf16 and
    gradients reduce in fp32. A frozen model (reference, reward model) is
    sharded the same way under FSDP2 and left whole under DDP (no gradients
    to average).
    """
    if not is_distributed():
        return module
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(device().type, (world_size(),))
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else \
            MixedPrecisionPolicy()
        for layer in decoder_layers(module):
            fully_shard(layer, mesh=mesh, mp_policy=policy)
        fully_shard(module, mesh=mesh, mp_policy=policy)
        return module
    if frozen:
        return module
    from torch.distributed._composable.replicate import replicate

    replicate(module, device_ids=[device().index] if device().type == "cuda" else None)
    return module


def is_sharded(module: nn.Module) -> bool:
    """True for a module ``wrap`` sharded with FSDP2 (its parameters are DTensors)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def sync_gradients(modules: Iterable[nn.Module], enabled: bool) -> None:
    """Turn the gradient reduction on (last micro-batch of a step) or off (the others)."""
    if not is_distributed():
        return
    for module in modules:
        if hasattr(module, "set_requires_gradient_sync"):
            module.set_requires_gradient_sync(enabled)


def full_tensor(value: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (an all-gather); a plain tensor as it is."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value


def local_tensor(value: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (no communication); a plain tensor as it is."""
    return value.to_local() if hasattr(value, "to_local") else value


def full_state_dict(module: nn.Module) -> dict | None:
    """The whole state dict of an FSDP2-sharded module, gathered to rank 0's CPU (every rank calls it); None otherwise."""
    if not is_sharded(module):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def generation_kwargs(module: nn.Module) -> dict:
    """FSDP2 needs every rank in every forward: ranks that finish early keep stepping (synced_gpus)."""
    return {"synced_gpus": True} if is_distributed() and is_sharded(module) else {}
