"""Full trainer checkpoints: OUTPUT/checkpoints/step_{n}/ is the whole state after optimizer step n.

    step_{n}/state/                  model + optimizer, torch.distributed.checkpoint (sharded under FSDP2)
    step_{n}/rng_rank_{r}.safetensors  each rank's torch RNG states
    step_{n}/trainer_state.json      step, data position, scheduler, world size, python RNG
    step_{n}/MANIFEST.json           size and sha256 of every file above
    step_{n}/COMPLETE                written last

Every rank writes into `.step_{n}.tmp`; after a barrier rank 0 hashes what was written (reading it back from
disk), writes the manifest and the marker, fsyncs the tree and renames it into place, so a `kill -9` at any
moment leaves either the previous complete checkpoint or the new one, never a half-written one that looks
complete. Leftover temporary directories are removed at the next start. A single-process trainer writes
through `BackgroundCheckpointer`: the state is copied in memory at the step and written by a thread, with the
same files and order, while training goes on.

On resume the newest complete checkpoint is verified against its manifest before anything is loaded: a
truncated, garbled or bit-flipped file is named in a warning, the checkpoint is renamed aside (to
`step_{n}.corrupt-<UTC time>`, kept for inspection) and the previous complete one is used; the steps after it are
retrained from the step batches still on disk. Paths, the marker and the manifest are the hand-off package's
(apprentice.handoff); bench/ckpt_hash.py measured the manifest of a 500 MB checkpoint at 1.2-1.9 s against
3.9-4.5 s for the save itself (shared, loaded 2-core CPU machine).
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.optim.lr_scheduler import LambdaLR

from apprentice import fsio
from apprentice.errors import ApprenticeError
from apprentice.handoff.manifest import ManifestError, read_json, verify_manifest, write_manifest
from apprentice.handoff.paths import MARKER, checkpoints_root, complete_steps, set_aside, step_name
from apprentice.trainer.world import World, barrier

log = logging.getLogger("apprentice.trainer")

FORMAT = 2
"""Marker format: 2 = the checkpoint has a MANIFEST.json (1, or no "format" key: written before checksums)."""


class CheckpointError(ApprenticeError):
    """A checkpoint that cannot be used (corrupt, truncated, written for another world size); names the file."""


@dataclass
class TrainerState:
    """What besides tensors a resume needs."""

    step: int
    """Optimizer steps done; the next step consumes rollouts/step_{step + 1} (the data position)."""
    scheduler: dict[str, Any]
    world_size: int


def complete_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """(step, dir) of every complete checkpoint, oldest first (complete = has its marker; not yet verified)."""
    return complete_steps(checkpoints_root(output_dir))


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = complete_checkpoints(output_dir)
    return found[-1][1] if found else None


def remove_partial(output_dir: Path, world: World) -> None:
    """Rank 0 deletes temporary directories a killed run left behind; everyone waits for it."""
    if world.is_main:
        root = checkpoints_root(output_dir)
        for tmp in [*root.glob(".step_*.tmp"), *root.glob(".step_*.old-*")]:
            shutil.rmtree(tmp, ignore_errors=True)
    barrier(world)


def _rng_tensors() -> dict[str, torch.Tensor]:
    out = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def verify_checkpoint(directory: Path) -> None:
    """Check every file against the manifest; raise CheckpointError naming the first bad file.

    A checkpoint written before manifests existed (marker format 1) is accepted unverified, with a warning.
    """
    try:
        marker = read_json(directory / MARKER, "completion marker")
        version = marker.get("format", 1)
        if not isinstance(version, int):
            raise CheckpointError(f"{directory / MARKER}: completion marker has a non-integer format {str(version)[:40]!r}")
        if version < FORMAT:
            log.warning("%s has no checksum manifest (written by an older apprentice): loading it unverified", directory)
            return
        verify_manifest(directory)
    except ManifestError as e:
        raise CheckpointError(str(e)) from None


def choose_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint that verifies; None when there is none at all.

    Newer ones that fail verification are logged (naming the bad file) and renamed to `step_{n}.corrupt-<UTC time>`
    so that neither this run's pruning nor a later resume mistakes them for good ones. When every complete
    checkpoint fails, nothing is renamed and a CheckpointError lists them all: starting over silently from
    step 0 would throw the run's progress away.
    """
    candidates = complete_checkpoints(output_dir)
    failures: list[tuple[Path, CheckpointError]] = []
    for _step, path in reversed(candidates):
        try:
            verify_checkpoint(path)
        except CheckpointError as e:
            log.warning("checkpoint %s failed verification: %s; trying the previous one", path.name, e)
            failures.append((path, e))
            continue
        for bad, _ in failures:
            aside = set_aside(bad, "corrupt")
            log.warning("moved the corrupt checkpoint aside to %s; resuming from %s (the steps after it are retrained)", aside, path)
        return path
    if failures:
        details = "; ".join(str(e) for _, e in failures)
        raise CheckpointError(
            f"no checkpoint in {checkpoints_root(output_dir)} passes verification ({details}). Restore the files "
            f"from a backup, or move the checkpoints directory aside to retrain from step 1"
        )
    return None


def resume(
    output_dir: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    world: World,
) -> int:
    """Collective: load the newest verified checkpoint (rank 0 verifies, every rank loads); steps done (0 if none)."""
    choice: list[str | None] = [None]
    error: list[str | None] = [None]
    if world.is_main:
        try:
            found = choose_checkpoint(output_dir)
            choice[0] = str(found) if found is not None else None
        except CheckpointError as e:
            error[0] = str(e)
    if world.distributed and dist.is_initialized():
        dist.broadcast_object_list(choice, src=0)
        dist.broadcast_object_list(error, src=0)
    if error[0] is not None:
        raise CheckpointError(error[0])
    if choice[0] is None:
        return 0
    return load_checkpoint(Path(choice[0]), model, optimizer, scheduler, world).step


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
    tmp, final = _save_dirs(output_dir, step, world)
    barrier(world)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    _write_state(tmp, model_sd, optim_sd, _rng_tensors(), world)
    if world.is_main:
        fsio.write_text(tmp / "trainer_state.json", json.dumps(_new_trainer_state(step, world, scheduler)))
    barrier(world)
    if world.is_main:
        _seal(output_dir, step, tmp, final, keep)
    barrier(world)
    return final


def _save_dirs(output_dir: Path, step: int, world: World) -> tuple[Path, Path]:
    """(the temporary directory a save of `step` writes into, emptied by rank 0; the directory it becomes)."""
    root = checkpoints_root(output_dir)
    tmp, final = root / f".{step_name(step)}.tmp", root / step_name(step)
    if world.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        fsio.make_dirs(tmp)
    return tmp, final


def _write_state(tmp: Path, model_sd: Any, optim_sd: Any, rng: dict[str, torch.Tensor], world: World) -> None:
    with warnings.catch_warnings():  # DCP warns that a 1-process save is 1-process, even with no_dist=True
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp / "state", no_dist=not world.distributed)
    save_file(rng, str(tmp / f"rng_rank_{world.rank}.safetensors"))


def _new_trainer_state(step: int, world: World, scheduler: torch.optim.lr_scheduler.LRScheduler) -> dict[str, Any]:
    return {"step": step, "world_size": world.world_size, "scheduler": scheduler.state_dict(),
            "python_rng": _python_rng_to_json(random.getstate())}  # fmt: skip


def _seal(output_dir: Path, step: int, tmp: Path, final: Path, keep: int) -> None:
    """Rank 0, once every file is written: durable, hashed, marked complete, renamed into place, older pruned."""
    fsio.sync_tree(tmp)  # the data is durable before the manifest vouches for it
    write_manifest(tmp, FORMAT)
    fsio.write_text(tmp / MARKER, json.dumps({"step": step, "format": FORMAT}))
    # Re-saving a step after a resume replaces the old copy (complete but superseded); replace_dir fsyncs.
    fsio.replace_dir(tmp, final)
    prune(output_dir, step, keep)


class BackgroundCheckpointer:
    """Single-process runs: a checkpoint is a copy of the state in memory, written by a thread while training goes
    on. Writing 1.6 GB (SmolLM2-135M with AdamW) and fsyncing it took ~8 s of mostly disk waits on the trainer's
    critical path; the copy takes a fraction of a second. Everything else is as `save_checkpoint`: the same files,
    the marker last, the rename; a kill before the thread finishes leaves the temporary directory, removed at the
    next start, and the previous complete checkpoint. At most one write is in flight: the next save, and
    `wait` (call it before the process ends), wait for it and re-raise its error."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def save(self, output_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             scheduler: torch.optim.lr_scheduler.LRScheduler, world: World, keep: int) -> Path:  # fmt: skip
        if world.distributed:
            raise ValueError("background checkpoints are for single-process runs; use save_checkpoint")
        self.wait()
        tmp, final = _save_dirs(output_dir, step, world)
        model_sd, optim_sd = get_state_dict(model, optimizer)
        staged = _copy_tree((model_sd, optim_sd))  # the state of this step, whatever training does next
        rng, state = _rng_tensors(), json.dumps(_new_trainer_state(step, world, scheduler))

        def write() -> None:
            try:
                _write_state(tmp, staged[0], staged[1], rng, world)
                fsio.write_text(tmp / "trainer_state.json", state)
                _seal(output_dir, step, tmp, final, keep)
            except BaseException as e:  # re-raised by the trainer's next save or wait
                self._error = e

        self._thread = threading.Thread(target=write, name=f"checkpoint-{step}", daemon=False)
        self._thread.start()
        return final

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def settle(self) -> None:
        """`wait` on the way out of a failed run: the write in flight completes; its own error is logged, not
        raised, so the error that stopped the run is the one reported."""
        try:
            self.wait()
        except Exception as e:
            log.error("the checkpoint being written when the run stopped failed too: %s", e)


def _copy_tree(value: Any) -> Any:
    """A deep copy of nested dicts/lists/tuples of tensors, tensors cloned to CPU memory."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _copy_tree(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_copy_tree(v) for v in value)
    return value


def prune(output_dir: Path, newest: int, keep: int) -> None:
    """Delete complete checkpoints older than the newest `keep`, counting the one just written (`newest`).

    Only checkpoints older than `newest` are candidates, and `newest` itself was hashed from disk a moment ago,
    so pruning never deletes the only verified checkpoint.
    """
    older = [path for step, path in complete_checkpoints(output_dir) if step < newest]
    for old in older[: max(0, len(older) - (keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    world: World,
) -> TrainerState:
    """Restore everything `save_checkpoint` wrote, in place. Collective under FSDP2."""
    raw = _trainer_state(path)
    if raw["world_size"] != world.world_size:
        # The sharded state itself could be resharded by DCP, but per-rank RNG and the data split could not.
        raise CheckpointError(
            f"{path} was written by {raw['world_size']} trainer rank(s), this run has {world.world_size}; "
            f"resume with the same trainer.num_processes or start a new output_dir"
        )
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state: dict[str, Any] = {"model": model_sd, "optim": optim_sd}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=path / "state", no_dist=not world.distributed)
    # The optimizer's state (moments, step counts) comes from the checkpoint, its hyperparameters from this run's
    # config: loading the state would also bring back the saved betas, eps and weight decay, and an edited
    # trainer.optim would be ignored without a word (lr follows the schedule below).
    configured = [{k: group[k] for k in HYPERPARAMETERS if k in group} for group in optimizer.param_groups]
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    for group, values in zip(optimizer.param_groups, configured, strict=True):
        group.update(values)
    restore_schedule_position(scheduler, int(raw["scheduler"]["last_epoch"]))
    rng = load_file(str(path / f"rng_rank_{world.rank}.safetensors"))
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    random.setstate(_python_rng_from_json(raw["python_rng"]))
    return TrainerState(step=int(raw["step"]), scheduler=raw["scheduler"], world_size=int(raw["world_size"]))


HYPERPARAMETERS = ("betas", "eps", "weight_decay")
"""Optimizer settings a resumed run takes from its config, not from the checkpoint (`load_checkpoint`)."""


def _trainer_state(path: Path) -> dict[str, Any]:
    try:
        return read_json(path / "trainer_state.json", "trainer state")
    except ManifestError as e:
        raise CheckpointError(str(e)) from None


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
