"""Step metrics: OUTPUT/trainer/metrics.jsonl (one object per step), optional wandb, a tqdm bar; rank 0 only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from apprentice.config.root import LogConfig
from apprentice.metrics import MetricsLog


def metrics_path(output_dir: Path) -> Path:
    return Path(output_dir) / "trainer" / "metrics.jsonl"


class MetricsLogger:
    """Writes on rank 0 and is a no-op elsewhere, so the train loop needs no rank checks."""

    def __init__(
        self, output_dir: Path, log: LogConfig, *, enabled: bool, start_step: int, max_steps: int, run_config: dict[str, Any]
    ) -> None:
        self.enabled = enabled
        self._bar: Any = None
        # On resume, lines for steps after the checkpoint are dropped: those steps are about to be redone.
        self._log = MetricsLog(metrics_path(output_dir), log, enabled=enabled, resume_after=start_step, wandb_config=run_config, wandb_also=Path(output_dir) / "orchestrator" / "metrics.jsonl")
        if enabled and log.progress:
            from tqdm import tqdm

            self._bar = tqdm(total=max_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        self._log.write({"step": step, **metrics})
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix({k: f"{metrics[k]:.4g}" for k in ("loss/total", "grad_norm") if k in metrics})

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        self._log.close()
