"""trainer.num_nodes / rdzv_endpoint: validation, world size and the torchrun command each node runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from apprentice.config import Config, TrainerConfig
from apprentice.launcher import trainer_command


def config(**trainer: Any) -> Config:
    return Config.model_validate({"model": {"name": "m"}, "output_dir": "/tmp/run", "inference": {},
                                  "trainer": {"loss": {"type": "sft"}, **trainer}})  # fmt: skip


def test_several_nodes_need_a_rendezvous_endpoint() -> None:
    with pytest.raises(ValidationError, match="trainer.rdzv_endpoint"):
        TrainerConfig(num_nodes=2)
    with pytest.raises(ValidationError, match="rdzv_endpoint"):
        TrainerConfig(num_nodes=2, rdzv_endpoint="no-port")
    assert TrainerConfig(num_nodes=3, num_processes=8, rdzv_endpoint="node0:29500").world_size == 24


def test_trainer_command_per_world_shape() -> None:
    path = Path("/tmp/run/config.toml")
    single = trainer_command(config(), path)
    assert "apprentice.torchrun" not in single and single[-2:] == ["train", str(path)]
    local = trainer_command(config(num_processes=4), path)
    assert "--standalone" in local and "--nproc-per-node=4" in local
    nodes = trainer_command(config(num_nodes=2, num_processes=8, rdzv_endpoint="node0:29500"), path)
    assert {"--nnodes=2", "--rdzv-backend=c10d", "--rdzv-endpoint=node0:29500", "--nproc-per-node=8"} <= set(nodes)
    assert "--standalone" not in nodes and not any(a.startswith("--node-rank") for a in nodes)  # the rendezvous assigns ranks


def test_apprentice_torchrun_names_a_rank_killed_by_a_signal_without_a_traceback(tmp_path: Path) -> None:
    """(A rank's user error, exit code 2, on two nodes: test_trainer_run.py's two-agent test.)"""
    import os
    import subprocess
    import sys

    script = tmp_path / "rank.py"
    script.write_text("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-m", "apprentice.torchrun", "--standalone", "--nproc-per-node=1", str(script)],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "trainer rank 0" in out and "killed by signal 9" in out, out
    assert "Traceback" not in out and "ChildFailedError" not in out, out
