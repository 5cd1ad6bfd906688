"""The launcher's supervision rules, with tiny real child processes standing in for orchestrator and trainer."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
from config_samples import MINIMAL

from apprentice.config import load_config
from apprentice.launcher import supervise, trainer_processes


def child(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_a_clean_stop_lets_the_trainer_finish_then_returns_the_stop_code(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The trainer, told the orchestrator stopped, trains the written steps, checkpoints and exports, then exits 0:
    it is not stopped before (it may be writing final/)."""
    done = tmp_path / "exported"
    trainer = f"import pathlib, time; time.sleep(1.0); pathlib.Path({str(done)!r}).write_text('ok')"
    code = supervise(
        {"orchestrator": child("import sys; sys.exit(3)"), "trainer": child(trainer)},
        env=dict(os.environ), must_finish="trainer", stop_code=3,
    )  # fmt: skip
    assert code == 3 and done.read_text() == "ok"
    assert "stopped cleanly" in capsys.readouterr().err


def test_any_other_exit_code_is_a_failure_that_stops_the_others(capsys: pytest.CaptureFixture[str]) -> None:
    started = time.monotonic()
    code = supervise(
        {"orchestrator": child("import sys; sys.exit(1)"), "trainer": child("import time; time.sleep(60)")},
        env=dict(os.environ), must_finish="trainer", stop_code=3,
    )  # fmt: skip
    assert code == 1 and time.monotonic() - started < 30
    assert "the orchestrator failed (exit code 1); stopping trainer" in capsys.readouterr().err


PEER = """
import pathlib, signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # print even if the launcher is already stopping this rank
while not pathlib.Path(sys.argv[1]).exists():  # rank 0 has stopped
    time.sleep(0.01)
time.sleep(0.3)
print("Traceback (most recent call last):\\nRuntimeError: Connection closed by peer", flush=True)
sys.exit(1)
"""
"""Rank 1 failing in its next collective once rank 0 has gone away."""


def test_after_one_rank_fails_the_other_ranks_lines_are_left_out(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Rank 0 stops on a user error; rank 1 then fails with a traceback that only says a peer went away:
    # the run shows rank 0's one line alone, with its exit code.
    gone = tmp_path / "rank0-gone"
    failing = (f"import pathlib, sys; print('apprentice train: error: rollouts/step_1/rank_0.safetensors is corrupt', "
               f"file=sys.stderr, flush=True); pathlib.Path({str(gone)!r}).touch(); sys.exit(1)")  # fmt: skip
    code = supervise({"trainer": child(failing), "trainer.1": [*child(PEER), str(gone)]}, env=dict(os.environ),
                     must_finish="trainer", peers=("trainer", "trainer.1"))  # fmt: skip
    out = capsys.readouterr()
    assert code == 1
    assert "[trainer] apprentice train: error: rollouts/step_1/rank_0.safetensors is corrupt" in out.out
    assert "Traceback" not in out.out + out.err and "the trainer failed (exit code 1)" in out.err


def test_an_unexpected_error_in_a_rank_keeps_its_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gone = tmp_path / "rank0-gone"
    crash = (f"import pathlib, sys, traceback\ntry:\n    raise ValueError('a bug')\nexcept ValueError:\n"
             f"    traceback.print_exc(); sys.stderr.flush(); pathlib.Path({str(gone)!r}).touch(); sys.exit(1)")  # fmt: skip
    code = supervise({"trainer": child(crash), "trainer.1": [*child(PEER), str(gone)]}, env=dict(os.environ),
                     must_finish="trainer", peers=("trainer", "trainer.1"))  # fmt: skip
    out = capsys.readouterr().out
    assert code == 1
    assert "[trainer] Traceback (most recent call last):" in out and "[trainer] ValueError: a bug" in out
    assert "Connection closed by peer" not in out


def test_one_node_ranks_are_started_by_the_launcher_and_several_nodes_by_torchrun(tmp_path: Path) -> None:
    toml = tmp_path / "run.toml"
    toml.write_text(MINIMAL.read_text())
    cfg = load_config([toml], ["--trainer.num_processes", "2"])
    commands, envs = trainer_processes(cfg, toml)
    assert list(commands) == ["trainer", "trainer.1"]
    assert all(c[-3:] == ["apprentice", "train", str(toml)] and "torch.distributed.run" not in c for c in commands.values())
    assert [(e["RANK"], e["LOCAL_RANK"], e["WORLD_SIZE"]) for e in envs.values()] == [("0", "0", "2"), ("1", "1", "2")]
    assert envs["trainer"]["MASTER_ADDR"] == "127.0.0.1" and envs["trainer"]["MASTER_PORT"] == envs["trainer.1"]["MASTER_PORT"]
    nodes = load_config([toml], ["--trainer.num_processes", "2", "--trainer.num_nodes", "2",
                                 "--trainer.rdzv_endpoint", "127.0.0.1:29500"])  # fmt: skip
    commands, envs = trainer_processes(nodes, toml)
    assert list(commands) == ["trainer"] and "apprentice.torchrun" in commands["trainer"] and envs == {}
