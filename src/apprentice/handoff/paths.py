"""Where every hand-off lives under OUTPUT (DESIGN.md, fixed layout) and how a reader knows one is complete.

    OUTPUT/rollouts/step_{n}/       orchestrator -> trainer step batches       (handoff.rollouts)
    OUTPUT/trainer/progress.json    the trainer's last finished step            (handoff.progress)
    OUTPUT/checkpoints/step_{n}/    full trainer state                          (trainer.ckpt)
    OUTPUT/weights/step_{n}/        rl mode: published weights for the server   (handoff.weights)
    OUTPUT/final/                   the exported student                        (handoff.hfdir)

Every directory hand-off is built under a temporary name and renamed into place with `MARKER` written last
inside it (apprentice.fsio.atomic_dir): a directory without the marker is still being written, or was left by
a killed writer, and no reader ever uses it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from apprentice import fsio

MARKER = "COMPLETE"
"""The completion marker of every directory hand-off, written last."""
MANIFEST = "MANIFEST.json"
"""Size and sha256 of every other file of a directory hand-off (handoff.manifest)."""


def rollouts_root(output_dir: Path) -> Path:
    return Path(output_dir) / "rollouts"


def checkpoints_root(output_dir: Path) -> Path:
    return Path(output_dir) / "checkpoints"


def weights_root(output_dir: Path) -> Path:
    return Path(output_dir) / "weights"


def step_name(step: int) -> str:
    return f"step_{step}"


def final_dir(output_dir: Path) -> Path:
    return Path(output_dir) / "final"


def progress_path(output_dir: Path) -> Path:
    return Path(output_dir) / "trainer" / "progress.json"


def complete_steps(root: Path) -> list[tuple[int, Path]]:
    """(step, dir) of every `root/step_{n}` holding the marker, oldest first (complete, not yet verified)."""
    if not root.is_dir():
        return []
    found = [(int(p.name[5:]), p) for p in root.glob("step_*") if p.name[5:].isdigit() and (p / MARKER).is_file()]
    return sorted(found)


def set_aside(path: Path, label: str) -> Path:
    """Rename a damaged hand-off to `NAME.{label}-{UTC time}` beside it (kept for inspection, never read again)."""
    aside = path.with_name(f"{path.name}.{label}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}")
    while aside.exists():
        aside = aside.with_name(aside.name + "x")
    os.rename(path, aside)
    fsio.fsync_dir(path.parent)
    return aside
