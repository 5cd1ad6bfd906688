"""Metrics sinks shared by every process: one JSON object per line (rank 0 only), wandb when configured,
and tqdm progress bars that can be switched off."""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any, TypeVar

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
        wandb_config: dict[str, Any] | None = None,
    ) -> None:  # fmt: skip
        self.enabled = enabled
        self._file: IO[str] | None = None
        self._wandb: Any = None
        if not enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume_after is not None and path.is_file():
            kept = [row for row in read_metrics(path) if int(row.get("step", 0)) <= resume_after]
            write_atomic(path, "".join(json.dumps(row) + "\n" for row in kept))
        # Created with the mode fsio gives the rewritten file, so a resume does not change it.
        self._file = open(path, "a", opener=lambda p, flags: os.open(p, flags, FILE_MODE))
        if log_cfg.wandb_project:
            import wandb  # optional extra: pip install 'apprentice[wandb]'

            self._wandb = wandb.init(project=log_cfg.wandb_project, name=log_cfg.wandb_name, config=wandb_config, resume="allow")

    def write(self, metrics: dict[str, Any]) -> None:
        if not self.enabled or self._file is None:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in metrics.items() if k != "step"}, step=int(metrics.get("step", 0)))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


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
