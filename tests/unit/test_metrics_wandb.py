"""One wandb run per output directory: the trainer logs its own and the orchestrator's metrics of each step.

wandb is a hosted service, so a recording stand-in module replaces it (the one mock here).
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from apprentice.config import LogConfig
from apprentice.metrics import MetricsLog
from apprentice.trainer.metrics import MetricsLogger


class FakeRun:
    def __init__(self, runs: list[dict[str, Any]], kwargs: dict[str, Any]) -> None:
        self.record = {"init": kwargs, "logs": []}
        runs.append(self.record)

    def log(self, data: dict[str, Any], step: int) -> None:
        self.record["logs"].append((step, data))

    def finish(self) -> None:
        self.record["finished"] = True


@pytest.fixture
def wandb_runs(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    runs: list[dict[str, Any]] = []
    fake = types.ModuleType("wandb")
    fake.init = lambda **kwargs: FakeRun(runs, kwargs)  # type: ignore[attr-defined]
    fake.util = types.SimpleNamespace(generate_id=lambda: f"run{len(runs)}")  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "wandb", fake)
    return runs


def test_the_trainer_is_the_one_writer_of_one_run_holding_both_processes_metrics(tmp_path: Path, wandb_runs: list[dict[str, Any]]) -> None:
    log_cfg = LogConfig(wandb_project="p", progress=False)
    orchestrator = MetricsLog(tmp_path / "orchestrator" / "metrics.jsonl", log_cfg, use_wandb=False)
    for step in (1, 2, 3):
        orchestrator.write({"step": step, "rollout/reward": step / 10})
    orchestrator.close()
    assert wandb_runs == []  # the orchestrator never starts a run of its own

    trainer = MetricsLogger(tmp_path, log_cfg, enabled=True, start_step=0, max_steps=3, run_config={})
    trainer.log(1, {"loss/nll": 2.0})
    trainer.log(2, {"loss/nll": 1.5})
    trainer.close()
    assert len(wandb_runs) == 1
    assert wandb_runs[0]["logs"] == [(1, {"rollout/reward": 0.1, "loss/nll": 2.0}), (2, {"rollout/reward": 0.2, "loss/nll": 1.5})]

    # A resumed trainer continues the same wandb run.
    resumed = MetricsLogger(tmp_path, log_cfg, enabled=True, start_step=2, max_steps=3, run_config={})
    resumed.log(3, {"loss/nll": 1.0})
    resumed.close()
    assert wandb_runs[1]["init"]["id"] == wandb_runs[0]["init"]["id"] and wandb_runs[1]["init"]["resume"] == "allow"
    assert wandb_runs[1]["logs"] == [(3, {"rollout/reward": 0.3, "loss/nll": 1.0})]
    assert json.loads((tmp_path / "trainer" / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 3
