"""Metrics sinks shared by every process: one JSON object per line (rank 0 only), wandb when configured,
and tqdm progress bars that can be switched off.

wandb: one run per output directory. The trainer's rank 0 is its only writer: with each of its steps it also
logs the orchestrator's metrics line of the same step (read from OUTPUT/orchestrator/metrics.jsonl, written
before the trainer can train that step), so trainer and orchestrator metrics share one run and one step axis.
The run id is kept beside the JSONL (`wandb_run_id`), so a resumed run continues the same wandb run.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any, TypeVar

from apprentice import fsio
from apprentice.config import LogConfig, write_atomic
from apprentice.fsio import FILE_MODE

T = TypeVar("T")


class MetricsLog:
    """Append-only JSONL of per-step metrics (flushed per line so a kill loses at most the current step).

    `resume_after=n` first drops the lines of steps after n: a resumed process redoes those steps, and the log
    must show each step once, as the run that finally produced it.
    """

    def __init__(
        self, path: Path, log_cfg: LogConfig, *, enabled: bool = True, resume_after: int | None = None,
        wandb_config: dict[str, Any] | None = None, use_wandb: bool = True, wandb_also: Path | None = None,
    ) -> None:  # fmt: skip
        """`use_wandb=False` keeps this log out of wandb; `wandb_also` is another process's JSONL whose line of the
        same step is logged to wandb together with each line written here."""
        self.enabled = enabled
        self._file: IO[str] | None = None
        self._wandb: Any = None
        self._also = _StepRows(wandb_also) if wandb_also is not None else None
        if not enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume_after is not None and path.is_file():
            kept = [row for row in read_metrics(path) if int(row.get("step", 0)) <= resume_after]
            write_atomic(path, "".join(json.dumps(row) + "\n" for row in kept))
        # Created with the mode fsio gives the rewritten file, so a resume does not change it.
        self._file = open(path, "a", opener=lambda p, flags: os.open(p, flags, FILE_MODE))
        if log_cfg.wandb_project and use_wandb:
            import wandb  # optional extra: pip install 'apprentice[wandb]'

            id_path = path.parent / "wandb_run_id"
            run_id = id_path.read_text().strip() if id_path.is_file() else wandb.util.generate_id()
            fsio.write_text(id_path, run_id)
            self._wandb = wandb.init(
                project=log_cfg.wandb_project, name=log_cfg.wandb_name, config=wandb_config, id=run_id, resume="allow"
            )

    def write(self, metrics: dict[str, Any]) -> None:
        if not self.enabled or self._file is None:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        if self._wandb is not None:
            step = int(metrics.get("step", 0))
            merged = dict(self._also.pop(step)) if self._also is not None else {}
            merged.update(metrics)
            self._wandb.log({k: v for k, v in merged.items() if k != "step"}, step=step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


class _StepRows:
    """Lines of a growing JSONL file by step, read incrementally (complete lines only)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._rows: dict[int, dict[str, Any]] = {}

    def pop(self, step: int) -> dict[str, Any]:
        if step not in self._rows and self.path.is_file():
            with self.path.open("rb") as f:
                f.seek(self._offset)
                data = f.read()
            complete = data[: data.rfind(b"\n") + 1]
            self._offset += len(complete)
            for line in complete.decode("utf-8").splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                self._rows[int(row.get("step", 0))] = row
        for old in [s for s in self._rows if s < step]:  # steps the trainer will not ask for again
            del self._rows[old]
        return self._rows.pop(step, {})


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All complete lines of a metrics file (a torn last line from a kill is skipped)."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def progress_bar(items: Iterable[T], log_cfg: LogConfig, *, enabled: bool = True, **kwargs: Any) -> Iterable[T]:
    """tqdm over `items` on stderr, or the plain iterable when progress bars are off (or not rank 0)."""
    if not (enabled and log_cfg.progress):
        return items
    from tqdm import tqdm

    return tqdm(items, file=sys.stderr, dynamic_ncols=True, **kwargs)
