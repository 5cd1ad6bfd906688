"""rl mode: the trainer -> inference server hand-off of weights, OUTPUT/weights/step_{n}/.

    OUTPUT/weights/step_{n}/    a Hugging Face directory (handoff.hfdir): config, model.safetensors, tokenizer,
                                MANIFEST.json (size + sha256 of each file), COMPLETE (written last)

The trainer `publish`es one after every optimizer step (only the newest `keep` stay). Every reader `verify`s a
directory before loading it: a `step_{n}` directory without the marker is still being written and is refused;
a complete one whose files do not match the manifest (truncated, overwritten, missing) is damaged: it is
renamed aside to `step_{n}.damaged-<UTC time>` (so no later poll mistakes it for published weights) and
reported in one line naming the directory and the bad file. Any other directory (a Hugging Face model the user
points the server at) needs its config and every weight file it names. A trainer resuming from checkpoint n
`republish`es the weights of step n when they are missing or damaged, so an orchestrator waiting for them is
never left waiting for weights that would not come.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from apprentice.errors import ApprenticeError
from apprentice.handoff.hfdir import write_hf_dir
from apprentice.handoff.manifest import ManifestError, read_json, verify_manifest
from apprentice.handoff.paths import MANIFEST, MARKER, complete_steps, set_aside, step_name, weights_root

log = logging.getLogger("apprentice.handoff")

DAMAGED = "damaged"
"""Label of a damaged published directory renamed aside: `step_{n}.damaged-<UTC time>`."""

_STEP_DIR = re.compile(r"step_\d+")
_SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")
_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


class WeightsError(ApprenticeError):
    """A weights directory that cannot be served; the message names the directory and what is wrong."""


class DamagedWeightsError(WeightsError):
    """Complete published weights whose files do not match their manifest; the directory was set aside."""


def weights_dir(output_dir: Path, step: int) -> Path:
    return weights_root(output_dir) / step_name(step)


def published_steps(output_dir: Path) -> list[int]:
    """Steps with complete published weights, ascending (complete = marker present; not yet verified)."""
    return [step for step, _ in complete_steps(weights_root(output_dir))]


def latest_published(output_dir: Path) -> int:
    """The newest step with complete weights; 0 when none (the initial model)."""
    steps = published_steps(output_dir)
    return steps[-1] if steps else 0


# ---- the trainer's side ----


def publish(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, output_dir: Path, step: int, keep: int
) -> Path | None:
    """Write OUTPUT/weights/step_{step}, then prune to the newest `keep`. Collective under FSDP2; rank 0 writes."""
    path = write_hf_dir(model, tokenizer, weights_dir(output_dir, step), step=step)
    if path is not None:
        prune(output_dir, keep)
    return path


def republish(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, output_dir: Path, step: int, keep: int
) -> bool:
    """On resume from checkpoint `step`: publish its weights again when they are missing or damaged. Collective.

    Rank 0 decides (verifying the directory) and tells the others, so every rank joins the same gather or none.
    Returns whether the weights were written.
    """
    needed = [False]
    if step > 0 and (not dist.is_initialized() or dist.get_rank() == 0):
        path = weights_dir(output_dir, step)
        try:
            verify(path)
        except WeightsError as e:
            log.warning("%s; publishing the weights of step %d again from its checkpoint", e, step)
            needed[0] = True
    if dist.is_initialized():
        dist.broadcast_object_list(needed, src=0)
    if needed[0]:
        publish(model, tokenizer, output_dir, step, keep)
    return needed[0]


def prune(output_dir: Path, keep: int) -> None:
    """Remove all but the newest `keep` complete weight directories (and leftovers of interrupted writes)."""
    root = weights_root(output_dir)
    for step in published_steps(output_dir)[:-keep]:
        shutil.rmtree(weights_dir(output_dir, step), ignore_errors=True)
    for leftover in root.glob(".step_*.tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def remove_after(output_dir: Path, step: int) -> list[int]:
    """Delete published weights newer than `step` (a resumed trainer redoes those steps); the removed steps."""
    removed = [s for s in published_steps(output_dir) if s > step]
    for s in removed:
        shutil.rmtree(weights_dir(output_dir, s), ignore_errors=True)
    return removed


# ---- the readers' side (launcher, inference server) ----


def verify(path: Path) -> None:
    """Raise WeightsError unless `path` can be loaded as it is; damaged published weights are set aside first.

    See the module docstring for what each kind of directory must hold.
    """
    path = Path(path)
    if not path.is_dir():
        raise WeightsError(f"weights directory {str(path)!r} does not exist (or is not a directory)")
    published = _STEP_DIR.fullmatch(path.name) is not None
    if not (path / MARKER).is_file():
        if published:
            raise WeightsError(f"weights directory {str(path)!r} has no {MARKER} marker: the trainer has not finished "
                               f"writing it; retry once the marker exists")  # fmt: skip
        _check_files(path)
        return
    try:
        if (path / MANIFEST).is_file() or read_json(path / MARKER, "completion marker").get("format") is not None:
            verify_manifest(path)
        else:  # written before manifests existed: its files are all there is to check
            _check_files(path)
    except (ManifestError, WeightsError) as e:
        if not published:
            raise WeightsError(f"weights directory {str(path)!r} is damaged: {e}") from None
        aside = set_aside(path, DAMAGED)
        raise DamagedWeightsError(f"damaged published weights {path}: {e}; moved aside to {aside.name}") from None


def latest_verified(output_dir: Path, report: Callable[[str], None] = log.warning) -> int:
    """The newest published step whose weights verify; damaged ones are set aside, each `report`ed in one line."""
    while (step := latest_published(output_dir)) > 0:
        try:
            verify(weights_dir(output_dir, step))
            return step
        except DamagedWeightsError as e:
            report(str(e))
    return 0


def _check_files(path: Path) -> None:
    """The config and every weight file a Hugging Face directory names must exist."""
    if not (path / "config.json").is_file():
        raise WeightsError(f"weights directory {str(path)!r} has no config.json: not a Hugging Face model directory")
    if any((path / name).is_file() for name in _SINGLE_FILES):
        return
    for name in _INDEXES:
        index = path / name
        if index.is_file():
            try:
                shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
            except (ValueError, KeyError, AttributeError) as e:
                raise WeightsError(f"{index}: not a valid weight index ({e})") from None
            missing = sorted(s for s in shards if not (path / s).is_file())
            if missing:
                raise WeightsError(f"weights directory {str(path)!r} is incomplete: missing {', '.join(missing)}")
            return
    raise WeightsError(f"weights directory {str(path)!r} has no weights (expected {' or '.join(_SINGLE_FILES)} "
                       f"or a sharded index)")  # fmt: skip
