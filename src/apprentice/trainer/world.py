"""Who am I in the job (from torchrun's environment), process-group and mesh setup, small collectives."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


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


def init_distributed(world: World, device: torch.device, *, mesh: bool) -> DeviceMesh | None:
    """Start the process group (NCCL on GPU, gloo on CPU) and return a 1-D data-parallel mesh named "dp".

    Under torchrun the group comes from its environment (one node or several: torchrun's rendezvous set
    MASTER_ADDR/PORT). A single process gets a 1-rank group over an in-process store when `mesh` is asked for
    (FSDP2 mixed precision on one process); otherwise no group and no mesh.
    """
    if not (world.distributed or mesh):
        return None
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if world.distributed:
            dist.init_process_group(backend)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return init_device_mesh(device.type, (world.world_size,), mesh_dim_names=("dp",))


def all_reduce_sum_(t: torch.Tensor, world: World) -> torch.Tensor:
    """Sum `t` over ranks in place and return it (identity for one process). No host synchronisation."""
    if world.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def step_counts(num_micro: int, loss_tokens: int, device: torch.device, world: World) -> tuple[int, int]:
    """(most micro-batches on any rank, loss tokens on all ranks) in one collective: the step's one early read.

    Both are needed on the host before the first forward (the loop count and the loss normaliser), and
    come from the data, not from the device's work, so reading them stalls nothing.
    """
    if not world.distributed:
        return num_micro, loss_tokens
    mine = torch.tensor([num_micro, loss_tokens], dtype=torch.int64, device=device)
    every = [torch.empty_like(mine) for _ in range(world.world_size)]
    dist.all_gather(every, mine)
    table = torch.stack(every).tolist()
    return max(row[0] for row in table), sum(row[1] for row in table)


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
    if dist.is_initialized():
        if completed and world.distributed:
            dist.barrier()
        dist.destroy_process_group()
