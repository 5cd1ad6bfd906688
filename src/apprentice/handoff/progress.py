"""The trainer -> orchestrator hand-off: OUTPUT/trainer/progress.json, the trainer's last finished step.

The orchestrator reads it for backpressure (it stays at most orchestrator.max_async_level steps ahead) and the
launcher to tell how far a run got. Written atomically after every optimizer step.
"""

from __future__ import annotations

import json
from pathlib import Path

from apprentice import fsio
from apprentice.errors import ApprenticeError
from apprentice.handoff.paths import progress_path


def write_trainer_progress(output_dir: Path, step: int) -> None:
    """Record (atomically) that the trainer finished optimizer step `step`."""
    fsio.write_text(progress_path(output_dir), json.dumps({"step": step}))


class ProgressError(ApprenticeError):
    """OUTPUT/trainer/progress.json cannot be read; the message names it and says how to fix it."""


def read_trainer_progress(output_dir: Path) -> int:
    """The trainer's last finished step (0 when it has not finished any).

    The file is written atomically, so a garbled one was damaged from outside. Guessing a value would be
    unsafe (0 can deadlock the orchestrator's backpressure against a trainer waiting for the next batch), so
    it is a ProgressError naming the file; deleting it is safe because the trainer rewrites it every step.
    """
    path = progress_path(output_dir)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return 0
    try:
        step = json.loads(raw.decode("utf-8"))["step"]
    except (UnicodeDecodeError, json.JSONDecodeError, TypeError, KeyError) as e:
        step, problem = None, f"{type(e).__name__}: {e}"
    else:
        problem = f"step is {step!r}, not a whole number >= 0"
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ProgressError(
            f"{path}: unreadable trainer progress file ({problem[:200]}). Fix: stop the run, delete the file and "
            f"rerun; the trainer rewrites it after every step"
        )
    return step
