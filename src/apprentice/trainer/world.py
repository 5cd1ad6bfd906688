"""Who am I in the job (from torchrun's environment), process-group setup, FSDP2 sharding, small collectives."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard


@dataclass(frozen=True)
class World:
    """This process's place in the job: 1 process under plain python, N under torchrun."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> World:
        """Read RANK / WORLD_SIZE / LOCAL_RANK (set by torchrun); defaults describe a single process."""
        return cls(
            rank=int(os.environ.get("RANK", "0")),
            world_size=int(os.environ.get("WORLD_SIZE", "1")),
            local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        )

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(choice: str, world: World) -> torch.device:
    """`trainer.device`: "auto" is this rank's CUDA device when there is one, else CPU."""
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError('trainer.device = "cuda" but no CUDA device is visible; use "auto" or "cpu"')
        torch.cuda.set_device(world.local_rank)
        return torch.device("cuda", world.local_rank)
    return torch.device("cpu")


def init_distributed(world: World, device: torch.device) -> DeviceMesh | None:
    """Start the process group (NCCL on GPU, gloo on CPU) and a 1-D data-parallel mesh named "dp"."""
    if not world.distributed:
        return None
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return init_device_mesh(device.type, (world.world_size,), mesh_dim_names=("dp",))


def shard_model(model: torch.nn.Module, mesh: DeviceMesh) -> torch.nn.Module:
    """FSDP2: `fully_shard` every transformer block, then the root (embeddings, final norm, lm_head).

    Gradients are reduced with SUM (see below), matching the global-token normalisation of the losses.

    Blocks are found through transformers' `_no_split_modules`, which names the decoder-layer class of any
    causal LM, so this works beyond Qwen3.
    """
    block_names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in block_names]
    if not blocks:
        raise RuntimeError(
            f"cannot find the transformer blocks of {type(model).__name__} (its _no_split_modules is "
            f"{sorted(block_names)}); FSDP2 needs them to shard per block"
        )
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            # Losses are already normalised by the step's global token count, so ranks' gradients must be
            # summed, not averaged. Plain SUM collectives also work on gloo (no PREMUL_SUM there).
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
    return model


def all_reduce_sum(values: list[float], device: torch.device, world: World) -> list[float]:
    """Sum a few floats over ranks in one collective (identity for one process)."""
    if not world.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def all_reduce_max(value: int, device: torch.device, world: World) -> int:
    if not world.distributed:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def barrier(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.barrier()


def shutdown(world: World, *, completed: bool) -> None:
    """Tear the process group down.

    After a completed run every rank meets at a barrier first: a rank that finishes early (rank 0 has the
    metrics file to close) would otherwise destroy its gloo pairs while a peer is still between collectives,
    and the peer's transport threads can abort it ("terminate called without an active exception") after all
    its work is done. After a failure there is no barrier: the other ranks may be stuck in another collective,
    and torchrun stops them.
    """
    if world.distributed and dist.is_initialized():
        if completed:
            dist.barrier()
        dist.destroy_process_group()
