"""Data parallelism through PyTorch's own engine: torchrun sets the environment, DDP or
FSDP2 (`fully_shard`) wraps the plain model from outside it.

Checkpoints always hold full (unsharded) tensors keyed by parameter name, gathered with
`torch.distributed.checkpoint.state_dict`; so a checkpoint written by any number of ranks,
DDP or FSDP, resumes on any other number, or on one process without torch.distributed.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from infmoe.errors import ConfigError
from infmoe.randomness import seeded


@dataclass(frozen=True)
class World:
    """Where this process sits: rank r of world_size, on `device`."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    parallel: str = "none"  # none | ddp | fsdp

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_world(parallel: str, device: torch.device) -> tuple[World, torch.device]:
    """Join the process group torchrun describes (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_*);
    NCCL on GPUs, Gloo on CPUs. A single process stays out of torch.distributed."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        if parallel not in ("auto", "none"):
            raise ConfigError(f"parallel={parallel!r} needs several processes: launch with "
                              "torchrun --nproc_per_node N -m infmoe.train ...")
        return World(), device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return World(rank, world_size, local_rank, "ddp" if parallel in ("auto", "none") else parallel), device


def wrap(model: nn.Module, world: World, device: torch.device) -> nn.Module:
    """The module to run forward/backward through: DDP around the model, or the model with
    FSDP2 applied in place (each block sharded, then the root)."""
    if world.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # DDP waits for a gradient of every parameter unless told some never come (the
        # router under gate="constant" gets none); asking costs a graph walk per step, so
        # ask only when the model has such parameters.
        unused = bool(parameters_without_gradient(model, device))
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                       find_unused_parameters=unused)
    if world.parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
    return model


def parameters_without_gradient(model: nn.Module, device: torch.device) -> list[str]:
    """Names of the trainable parameters the loss never reaches, read off the autograd graph
    of one forward on a single token (no backward, the RNG untouched). Every variant holds
    its experts or blocks as whole tensors, so what one token reaches is what any batch does."""
    idx = torch.zeros(1, 1, dtype=torch.long, device=device)
    with seeded(0, device):
        loss = model(idx, idx).loss
    reached, seen, stack = set(), set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if hasattr(node, "variable"):  # an AccumulateGrad node: a leaf that gets a gradient
            reached.add(id(node.variable))
        stack.extend(next_node for next_node, _ in node.next_functions)
    return [name for name, p in model.named_parameters() if p.requires_grad and id(p) not in reached]


@contextlib.contextmanager
def gradient_sync(module: nn.Module, world: World, enabled: bool):
    """Skip the gradient all-reduce on all but the last micro-step of an accumulation."""
    if world.parallel == "ddp" and not enabled:
        with module.no_sync():
            yield
        return
    if world.parallel == "fsdp":
        module.set_requires_gradient_sync(enabled)
    yield


def all_reduce_sum(value: torch.Tensor, world: World) -> torch.Tensor:
    if world.distributed:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def weights_finite(model: nn.Module, world: World) -> bool:
    """Whether every weight of every rank (each rank's shard under FSDP) is finite; the same
    answer on every rank."""
    local = all(bool(torch.isfinite(_local(p)).all()) for p in model.parameters())
    if not world.distributed:
        return local
    flag = torch.tensor([0.0 if local else 1.0], device=next(model.parameters()).device)
    dist.all_reduce(flag, op=dist.ReduceOp.SUM)
    return flag.item() == 0


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor  # an FSDP2 DTensor: this rank's shard


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer, world: World):
    """(weights, optimizer state), both full and on CPU, keyed by parameter name. A
    collective under FSDP: every rank calls it; only rank 0's copy is complete."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions, get_model_state_dict, get_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options), get_optimizer_state_dict(model, optimizer, options=options)


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, world: World) -> None:
    """Load a full, name-keyed optimizer state (see `full_state`) into `optimizer`."""
    if world.parallel == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, optim_state_dict=state,
                                 options=StateDictOptions(full_state_dict=True))
        return
    # Unsharded parameters: torch.optim's own state_dict numbers them in group order.
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    index = {name: i for i, name in enumerate(order)}
    groups = [{**saved, "params": [index[n] for n in saved["params"]]} for saved in state["param_groups"]]
    optimizer.load_state_dict({"state": {index[n]: s for n, s in state["state"].items()}, "param_groups": groups})


def shutdown(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
