"""Full trainer checkpoints: OUTPUT/checkpoints/step_{n}/ is the whole state after optimizer step n.

    step_{n}/state/                  model + optimizer, torch.distributed.checkpoint (sharded under FSDP2)
    step_{n}/rng_rank_{r}.safetensors  each rank's torch RNG states
    step_{n}/trainer_state.json      step, data position, scheduler, world size, python RNG
    step_{n}/COMPLETE                written last

Every rank writes into `.step_{n}.tmp`; after a barrier rank 0 adds the marker and renames the directory into
place, so a `kill -9` at any moment leaves either the previous complete checkpoint or the new one, never a
half-written one that looks complete. Leftover temporary directories are removed at the next start.
"""

from __future__ import annotations

import json
import random
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.optim.lr_scheduler import LambdaLR

from apprentice.trainer.world import World, barrier

MARKER = "COMPLETE"


@dataclass
class TrainerState:
    """What besides tensors a resume needs."""

    step: int
    """Optimizer steps done; the next step consumes rollouts/step_{step + 1} (the data position)."""
    scheduler: dict[str, Any]
    world_size: int


def checkpoints_root(output_dir: Path) -> Path:
    return Path(output_dir) / "checkpoints"


def complete_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """(step, dir) of every complete checkpoint, oldest first."""
    root = checkpoints_root(output_dir)
    found = [
        (int(p.name[5:]), p)
        for p in root.glob("step_*")
        if p.name[5:].isdigit() and (p / MARKER).is_file()
    ]
    return sorted(found)


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = complete_checkpoints(output_dir)
    return found[-1][1] if found else None


def remove_partial(output_dir: Path, world: World) -> None:
    """Rank 0 deletes temporary directories a killed run left behind; everyone waits for it."""
    if world.is_main:
        for tmp in checkpoints_root(output_dir).glob(".step_*.tmp"):
            shutil.rmtree(tmp, ignore_errors=True)
    barrier(world)


def _rng_tensors() -> dict[str, torch.Tensor]:
    out = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def save_checkpoint(
    output_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    world: World,
    keep: int,
) -> Path:
    """Collective: every rank calls it. Returns the final directory; prunes to the newest `keep`."""
    root = checkpoints_root(output_dir)
    tmp, final = root / f".step_{step}.tmp", root / f"step_{step}"
    if world.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(world)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    with warnings.catch_warnings():  # DCP warns that a 1-process save is 1-process, even with no_dist=True
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp / "state", no_dist=not world.distributed)
    save_file(_rng_tensors(), str(tmp / f"rng_rank_{world.rank}.safetensors"))
    if world.is_main:
        state = {
            "step": step,
            "world_size": world.world_size,
            "scheduler": scheduler.state_dict(),
            "python_rng": _python_rng_to_json(random.getstate()),
        }
        (tmp / "trainer_state.json").write_text(json.dumps(state))
    barrier(world)
    if world.is_main:
        (tmp / MARKER).write_text(json.dumps({"step": step}))
        if final.exists():  # re-saving a step after a resume: the old copy is complete but superseded
            shutil.rmtree(final)
        tmp.rename(final)
        for _, old in complete_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier(world)
    return final


def load_checkpoint(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    world: World,
) -> TrainerState:
    """Restore everything `save_checkpoint` wrote, in place. Collective under FSDP2."""
    raw = json.loads((path / "trainer_state.json").read_text())
    if raw["world_size"] != world.world_size:
        # The sharded state itself could be resharded by DCP, but per-rank RNG and the data split could not.
        raise RuntimeError(
            f"{path} was written by {raw['world_size']} trainer rank(s), this run has {world.world_size}; "
            f"resume with the same trainer.num_processes or start a new output_dir"
        )
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state: dict[str, Any] = {"model": model_sd, "optim": optim_sd}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=path / "state", no_dist=not world.distributed)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    restore_schedule_position(scheduler, int(raw["scheduler"]["last_epoch"]))
    rng = load_file(str(path / f"rng_rank_{world.rank}.safetensors"))
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    random.setstate(_python_rng_from_json(raw["python_rng"]))
    return TrainerState(step=int(raw["step"]), scheduler=raw["scheduler"], world_size=int(raw["world_size"]))


def restore_schedule_position(scheduler: torch.optim.lr_scheduler.LRScheduler, last_epoch: int) -> None:
    """Put the schedule at `last_epoch` under the *current* config and set the optimizer's lr accordingly.

    Only the position is restored: base lrs and the schedule's shape come from this run's config, so a resume
    with an edited `trainer.optim` (or a longer `max_steps`) follows the new schedule from where it stands.
    """
    if not isinstance(scheduler, LambdaLR):
        raise TypeError(f"expected the LambdaLR of optim.build_scheduler, got {type(scheduler).__name__}")
    scheduler.last_epoch = last_epoch
    lrs = [base * fn(last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    scheduler._last_lr = lrs  # what get_last_lr() reports


def _python_rng_to_json(state: tuple[Any, ...]) -> list[Any]:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _python_rng_from_json(data: list[Any]) -> tuple[Any, ...]:
    return (data[0], tuple(data[1]), data[2])
