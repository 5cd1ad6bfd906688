"""Step metrics: OUTPUT/trainer/metrics.jsonl (one object per step), optional wandb, a tqdm bar; rank 0 only."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from apprentice.config.load import write_atomic
from apprentice.config.root import LogConfig


def metrics_path(output_dir: Path) -> Path:
    return Path(output_dir) / "trainer" / "metrics.jsonl"


def read_metrics(output_dir: Path) -> list[dict[str, Any]]:
    path = metrics_path(output_dir)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricsLogger:
    """Writes on rank 0 and is a no-op elsewhere, so the train loop needs no rank checks."""

    def __init__(
        self, output_dir: Path, log: LogConfig, *, enabled: bool, start_step: int, max_steps: int, run_config: dict[str, Any]
    ) -> None:
        self.enabled = enabled
        self.path = metrics_path(output_dir)
        self._bar: Any = None
        self._wandb: Any = None
        if not enabled:
            return
        self._drop_after(start_step)
        if log.progress:
            from tqdm import tqdm

            self._bar = tqdm(total=max_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
        if log.wandb_project:
            import wandb  # lazy: only runs that ask for wandb need it installed

            self._wandb = wandb.init(project=log.wandb_project, name=log.wandb_name, config=run_config, resume="allow")

    def _drop_after(self, step: int) -> None:
        """On resume, forget lines for steps after the checkpoint: those steps are about to be redone."""
        if not self.path.is_file():
            return
        kept = [line for line in self.path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        write_atomic(self.path, "".join(line + "\n" for line in kept))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **metrics}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix({k: f"{metrics[k]:.4g}" for k in ("loss/total", "grad_norm") if k in metrics})

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._wandb is not None:
            self._wandb.finish()
