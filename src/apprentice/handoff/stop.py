"""The orchestrator's word to the trainer that no later step batch will come (this attempt): OUTPUT/orchestrator/
stopped.json {"step": last written step, "reason": ...}, written when a spend cap stops the orchestrator. The trainer,
waiting for a step past it, trains nothing more: it checkpoints, exports final/ and exits 0. A new attempt's
launcher (and orchestrator) clears it first. No torch here: the launcher imports this.
"""

from __future__ import annotations

import json
from pathlib import Path

from apprentice import fsio


class RunStopped(Exception):
    """The orchestrator stopped for good after step `last` (a spend cap): no later batch will come. Not an error:
    the trainer checkpoints and exports what it trained."""

    def __init__(self, last: int, reason: str) -> None:
        super().__init__(f"the orchestrator stopped after step {last} ({reason})")
        self.last = last
        self.reason = reason


def stop_path(output_dir: Path) -> Path:
    return output_dir / "orchestrator" / "stopped.json"


def mark_stopped(output_dir: Path, last: int, reason: str) -> None:
    """Tell the trainer that no batch after step `last` will be written (this attempt)."""
    fsio.write_text(stop_path(output_dir), json.dumps({"step": last, "reason": reason}))


def clear_stopped(output_dir: Path) -> None:
    """A new attempt (the launcher, before anything starts): the previous attempt's stop no longer holds."""
    stop_path(output_dir).unlink(missing_ok=True)


def stopped_after(output_dir: Path) -> RunStopped | None:
    """The stop the orchestrator announced, or None (also for an unreadable file: waiting is the safe side)."""
    try:
        data = json.loads(stop_path(output_dir).read_text())
        return RunStopped(int(data["step"]), str(data["reason"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
